"""Text <-> tokens for a model folder: the tokenizer, the chat template, end-of-turn ids, and
incremental decoding for streaming.

The template is the model's own Jinja template rendered the way transformers'
`apply_chat_template` renders it (sandboxed, trim_blocks/lstrip_blocks, the same helpers).
"""
import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from ..errors import LlaisysError


class ChatFormat:
    """Renders conversations to token ids and decodes generated ids back to text."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise LlaisysError(f"{folder / 'tokenizer.json'}: cannot load tokenizer ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if not template:
            raise LlaisysError(f"{folder}: the model has no chat template")
        self.special_tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self._template = _compile(template, folder)
        self.stop_ids = frozenset(self._end_ids(folder, config))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise LlaisysError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation, ending with the assistant's turn opened."""
        return self.encode(self.render(messages))

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in it (like <|im_start|>) count as themselves."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens included."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder that turns ids into text pieces one at a time."""
        return StreamDecoder(self.tokenizer)

    def _end_ids(self, folder: Path, config: dict) -> list[int]:
        """End-of-turn ids: generation_config's eos_token_id (int or list), else the tokenizer's eos."""
        ids = _read_json(folder / "generation_config.json").get("eos_token_id")
        if ids is None:
            ids = _read_json(folder / "config.json").get("eos_token_id")
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        eos = self.special_tokens.get("eos_token")
        if eos and self.tokenizer.token_to_id(eos) is not None:
            ids.append(self.tokenizer.token_to_id(eos))
        if not ids:
            raise LlaisysError(f"{folder}: no end-of-sequence token id in generation_config.json or tokenizer_config.json")
        return ids


class StreamDecoder:
    """Incremental detokenizer: holds back bytes until they form whole characters."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)

    def step(self, token_id: int) -> str:
        """The text that token_id completes (may be empty)."""
        return self._stream.step(self._tokenizer, token_id) or ""


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlaisysError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(token) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    return token.get("content") if isinstance(token, dict) else token


def _compile(template: str, folder: Path) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LlaisysError(f"{folder}: chat template does not parse ({e})") from None
