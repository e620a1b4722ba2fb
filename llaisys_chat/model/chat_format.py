"""Text <-> tokens for a model folder: the tokenizer, the chat template, end-of-turn ids, and
incremental decoding for streaming.

The template is the model's own Jinja template rendered the way transformers'
`apply_chat_template` renders it (sandboxed, trim_blocks/lstrip_blocks, the same helpers). Templates
come with model files from the internet, so rendering is also bounded in time and in the size of
what a template can build.
"""
import json
import time
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
        self.special_tokens = {k: _token_text(config.get(k), k, folder) for k in ("bos_token", "eos_token", "pad_token",
                                                                                  "unk_token")}
        self._template = _compile(template, folder)
        self.stop_ids = frozenset(self._end_ids(folder, config))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text."""
        self._template.environment.deadline = time.monotonic() + RENDER_SECONDS
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except (jinja2.TemplateError, TemplateLimit) as e:
            raise LlaisysError(f"chat template failed: {e}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as e:
            raise LlaisysError(f"chat template failed: {type(e).__name__}: {e}") from None

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
        ids = [ids] if isinstance(ids, int) else ids or []
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise LlaisysError(f"{folder}: eos_token_id must be a token id or a list of them, not {ids!r}")
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


def _token_text(token, key: str, folder: Path) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    text = token.get("content") if isinstance(token, dict) else token
    if text is not None and not isinstance(text, str):
        raise LlaisysError(f"{folder / 'tokenizer_config.json'}: {key} must be text, not {text!r}")
    return text


RENDER_SECONDS = 2.0          # a chat template's whole render
MAX_BUILT_ITEMS = 1_000_000   # the longest string or list a template may build with * or **


class TemplateLimit(Exception):
    """A template ran too long or built too much."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no attribute writes, no unsafe calls, range() capped at 100,000
    items), with a deadline checked at every call and attribute lookup, and * and ** on sequences
    and numbers capped."""

    intercepted_binops = frozenset(["*", "**"])
    deadline = float("inf")

    def _check_time(self):
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering took over {RENDER_SECONDS:.0f} s")

    def call(self, __context, __obj, *args, **kwargs):
        self._check_time()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self._check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._check_time()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        self._check_time()
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimit(f"exponent {right} is too large")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_BUILT_ITEMS:
                    raise TemplateLimit(f"a template built a sequence of {len(seq) * count} items")
        return super().call_binop(context, operator, left, right)


def _compile(template: str, folder: Path) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except (jinja2.TemplateSyntaxError, RecursionError) as e:
        raise LlaisysError(f"{folder}: chat template does not parse ({type(e).__name__}: {e})") from None
