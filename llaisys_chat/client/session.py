"""A conversation: the system prompt and messages, the sampling settings, and its cache on the engines.

The REPL, the Jupyter magic and the chat kernel all hold their conversations as Sessions. A
Session talks to any client with ClusterClient's generate(); it knows nothing of how replies are made.
"""
import json
import uuid
from pathlib import Path

from ..errors import EnginesDown, LlaisysError
from ..protocol.messages import validate_messages, visible_reply
from ..protocol.reply import Reply
from ..protocol.request import check_context_policy
from ..protocol.sampling import SamplingParams

FORMAT_VERSION = 1
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "max_new_tokens", "context")
CHAT_DEFAULTS = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}  # Qwen2.5's recommended sampling for chat


class Session:
    """Messages of one conversation; send() appends the user's turn and the model's reply."""

    def __init__(self, client, system: str | None = None, sampling: dict | None = None):
        self._client = client
        self.system = system
        self.messages: list[dict] = []
        self.sampling: dict = dict(sampling or {})
        self.key = uuid.uuid4().hex  # names this conversation's cache on the engines
        self.last_reply: Reply | None = None
        self.set(**self.sampling)

    # -- the conversation ---------------------------------------------------------------------

    def send(self, text: str, stream: bool = False, **sampling):
        """The user's turn: a Reply, or with stream=True an iterator of text pieces (a ReplyStream).

        The reply joins the conversation when it ends, also when it is stopped part-way.
        """
        if not isinstance(text, str) or not text.strip():
            raise LlaisysError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        return self._reply(stream, sampling, undo=self.messages.pop)

    def regenerate(self, stream: bool = False, **sampling):
        """Replace the last reply with a new one (or answer the last message, if it has no reply:
        the engines went down before one began)."""
        if not self.messages:
            raise LlaisysError("there is no reply to regenerate")
        if self.messages[-1]["role"] != "assistant":
            return self._reply(stream, sampling, undo=lambda: None)
        previous = self.messages.pop()
        return self._reply(stream, sampling, undo=lambda: self.messages.append(previous))

    def undo(self) -> str | None:
        """Remove the last exchange (the user's message and its reply); returns the user's text."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            return self.messages.pop()["content"]
        return None

    def reset(self) -> None:
        """Forget the messages (the system prompt and settings stay)."""
        self.messages = []
        self.last_reply = None

    def prompt_messages(self) -> list[dict]:
        """What the model sees: the system prompt, then the messages (reasoning text removed)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        shown = [{**m, "content": visible_reply(m["content"])} if m["role"] == "assistant" else m for m in self.messages]
        return system + shown

    # -- settings and files -------------------------------------------------------------------

    def set(self, **sampling) -> None:
        """Change settings (temperature, top_k, top_p, seed, max_new_tokens, context); checked now."""
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise LlaisysError(f"unknown setting {sorted(unknown)[0]!r}; settings are {', '.join(SAMPLING_KEYS)}")
        merged = {**self.sampling, **sampling}
        SamplingParams(**{k: merged[k] for k in ("temperature", "top_k", "top_p", "seed") if k in merged})
        if "max_new_tokens" in merged and not (isinstance(merged["max_new_tokens"], int) and merged["max_new_tokens"] > 0):
            raise LlaisysError(f"max_new_tokens must be a positive whole number, not {merged['max_new_tokens']!r}")
        check_context_policy(merged.get("context", "trim"))
        self.sampling = merged

    def state(self) -> dict:
        """The conversation and its settings as plain data (what save() writes)."""
        return {"version": FORMAT_VERSION, "system": self.system, "messages": list(self.messages),
                "sampling": dict(self.sampling)}

    def restore(self, state, source: str = "the conversation") -> None:
        """Replace this conversation with one from state(); checked first, unchanged on error."""
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            raise LlaisysError(f"{source}: not a saved conversation (version {FORMAT_VERSION} expected)")
        messages = validate_messages(state.get("messages"))
        system = state.get("system")
        if system is not None and not isinstance(system, str):
            raise LlaisysError(f"{source}: 'system' must be text")
        settings = state.get("sampling") or {}
        if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
            raise LlaisysError(f"{source}: 'sampling' must be an object of settings")
        sampling, self.sampling = self.sampling, {}
        try:
            self.set(**settings)
        except LlaisysError:
            self.sampling = sampling
            raise
        self.system, self.messages = system, messages

    def save(self, path) -> Path:
        """Write the conversation and its settings to a JSON file."""
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps(self.state(), indent=2, ensure_ascii=False))
        except OSError as e:
            raise LlaisysError(f"cannot save to {path}: {e.strerror}") from None
        return path

    def load(self, path) -> None:
        """Replace this conversation with one saved by save()."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise LlaisysError(f"cannot read {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlaisysError(f"{path}: not a saved conversation ({e})") from None
        self.restore(data, source=str(path))

    # -- plumbing ------------------------------------------------------------------------------

    def _reply(self, stream: bool, overrides: dict, undo):
        """Generate the next reply; if it fails before any reply exists, undo() puts the
        conversation back as it was (unless the engines went down: then the message stays, to be
        answered by /retry or followed by the next one once they are back)."""
        settings = {**self.sampling, **overrides}
        try:
            reply_stream = self._client.generate(self.prompt_messages(), stream=True, session_key=self.key, **settings)
        except EnginesDown:
            raise
        except BaseException:
            undo()
            raise
        recording = _RecordingStream(reply_stream, self, undo)
        if stream:
            return recording
        for _ in recording:
            pass
        return recording.reply

    def _record(self, reply: Reply) -> None:
        self.last_reply = reply
        self.messages.append({"role": "assistant", "content": reply.text})


class _RecordingStream:
    """A ReplyStream whose reply joins the session when it ends, however it ends."""

    def __init__(self, stream, session: Session, undo):
        self._stream, self._session, self._undo = stream, session, undo

    def __iter__(self):
        try:
            yield from self._stream
        except BaseException as e:
            if self._stream.reply is not None:  # stopped, or cut short by an engine going down: keep what was said
                self._session._record(self._stream.reply)
            elif not isinstance(e, EnginesDown):
                self._undo()  # failed before a reply existed: the turn did not happen
            if isinstance(e, GeneratorExit):
                return
            raise
        self._session._record(self._stream.reply)

    def stop(self) -> None:
        """Stop the reply on all ranks; the text so far stays in the conversation."""
        self._stream.stop()

    def __getattr__(self, name):
        return getattr(self._stream, name)
