"""Slash commands (/set, /undo, /save, ...), shared by the terminal REPL and the chat kernel.

A command changes the session or reports on it and returns what to show; anything a user can get
wrong raises LlaisysError with a one-line hint. Commands that need a new reply (/retry) say so in
their result, and the front end streams it the way it streams any reply.
"""
import shlex
from dataclasses import dataclass

from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from ..errors import LlaisysError

# /set names -> Session.sampling keys, with how to read the value.
PARAMETERS = {"temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
              "max_tokens": ("max_new_tokens", int), "seed": ("seed", int), "context": ("context", str)}

HELP = """Commands:
  /system [TEXT]        show the system prompt, or set it
  /set PARAM VALUE      temperature, top_k, top_p, max_tokens, seed (seed none = random),
                        context trim|error (let a long conversation's oldest messages go, or refuse)
  /show                 settings, model, ranks and context use
  /reset  (/clear)      start a new conversation
  /history              the conversation so far
  /undo                 remove the last exchange
  /retry                replace the last reply with a new one (or answer a message left without one)
  /restart              restart the engines and reload the model (done by itself when one goes down)
  /save FILE, /load FILE  write or read the conversation as JSON
  /stats                the last reply: tokens, time to first token, prefill and decode speed
  /think show|hide      show reasoning (<think>...</think>) dimmed, or hide it
  /help                 this list
  /quit  (/exit, /bye)  leave; Ctrl-D too
Input: Enter sends; Alt-Enter (or Esc then Enter) starts a new line; a message may also be
wrapped in \"\"\" lines. Ctrl-C stops a reply and keeps what was written."""

NAMES = ["/system", "/set", "/show", "/history", "/reset", "/clear", "/undo", "/retry", "/restart", "/save", "/load", "/stats", "/think",
         "/help", "/quit", "/exit", "/bye"]


def format_stats(reply) -> str:
    """One line about a reply: tokens, why it ended, time to first token, prefill and decode speed."""
    s = reply.stats
    return (f"{s.new_tokens} tokens ({s.finish_reason}); prompt {s.prompt_tokens} tokens, {s.cached_tokens} cached; "
            f"first token {s.first_token_seconds * 1000:.0f} ms; prefill {s.prefill_tokens_per_s:.1f} tok/s; "
            f"decode {s.decode_tokens_per_s:.1f} tok/s")


@dataclass
class CommandResult:
    """What a command asks of the front end: text to show, and whether to quit or regenerate."""

    text: str = ""
    quit: bool = False
    regenerate: bool = False


class Commands:
    """Runs slash commands against one session (and the client it talks through)."""

    def __init__(self, session, client):
        self.session, self.client = session, client
        self.show_thinking = True

    def run(self, line: str) -> CommandResult:
        """Run one command line (starting with '/')."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise LlaisysError(f"cannot parse the command: {e}") from None
        if not words:
            raise LlaisysError("empty command; /help lists them")
        name, args = words[0].lower(), words[1:]
        handler = _HANDLERS.get(name)
        if handler is None:
            raise LlaisysError(f"unknown command {name}; /help lists them")
        if name == "/system":  # the prompt is free text: keep it as typed
            rest = line.strip()[len(words[0]):].strip()
            args = [rest] if rest else []
        return handler(self, args)

    def _system(self, args):
        if not args:
            return CommandResult(f"System prompt: {self.session.system or '(none)'}")
        self.session.system = args[0]
        return CommandResult("System prompt set.")

    def _set(self, args):
        if len(args) != 2:
            raise LlaisysError(f"usage: /set PARAM VALUE (PARAM is one of {', '.join(PARAMETERS)})")
        name, text = args[0].lower(), args[1]
        if name not in PARAMETERS:
            raise LlaisysError(f"unknown parameter {name}; use one of {', '.join(PARAMETERS)}")
        key, kind = PARAMETERS[name]
        if key == "seed" and text.lower() == "none":
            self.session.sampling.pop("seed", None)
            return CommandResult("seed: random")
        try:
            value = kind(text)
        except ValueError:
            raise LlaisysError(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {text!r}") from None
        self.session.set(**{key: value})
        return CommandResult(f"{name} = {value}")

    def _show(self, args):
        info = self.client.info()
        settings = ", ".join(f"{n}={self.session.sampling.get(k, 'random' if k == 'seed' else 'default')}"
                             for n, (k, _) in PARAMETERS.items())
        used = self.context_used()
        lines = [f"Model: {info['model']} ({info['folder']})",
                 f"Ranks: {info['ranks']} on {', '.join(info['hosts'])}, {info['threads_per_rank']} thread(s) each, weights {info['weights']}",
                 f"Context: {used} of {info['max_context']} tokens used",
                 f"Settings: {settings}",
                 f"System prompt: {self.session.system or '(none)'}",
                 f"Messages: {len(self.session.messages)}"]
        return CommandResult("\n".join(lines))

    def _history(self, args):
        lines = [f"{m['role']}: {m['content']}" for m in self.session.prompt_messages()]
        return CommandResult("\n\n".join(lines) or "(no messages yet)")

    def _reset(self, args):
        self.session.reset()
        return CommandResult("New conversation.")

    def _undo(self, args):
        text = self.session.undo()
        if text is None:
            raise LlaisysError("nothing to undo")
        return CommandResult(f"Removed: {_shorten(text)}")

    def _retry(self, args):
        if not self.session.messages:
            raise LlaisysError("there is no reply to retry")
        return CommandResult(regenerate=True)  # a last message without a reply gets one

    def _restart(self, args):
        self.client.restart()
        return CommandResult(f"Engines restarted; the conversation ({len(self.session.messages)} messages) carries on.")

    def _save(self, args):
        if len(args) != 1:
            raise LlaisysError("usage: /save FILE")
        return CommandResult(f"Saved to {self.session.save(args[0])}")

    def _load(self, args):
        if len(args) != 1:
            raise LlaisysError("usage: /load FILE")
        self.session.load(args[0])
        return CommandResult(f"Loaded {len(self.session.messages)} messages from {args[0]}")

    def _stats(self, args):
        if self.session.last_reply is None:
            raise LlaisysError("no reply yet")
        return CommandResult(format_stats(self.session.last_reply))

    def _think(self, args):
        if args not in (["show"], ["hide"]):
            raise LlaisysError("usage: /think show|hide")
        self.show_thinking = args[0] == "show"
        return CommandResult(f"Reasoning will be {'shown dimmed' if self.show_thinking else 'hidden'}.")

    def _help(self, args):
        return CommandResult(HELP)

    def _quit(self, args):
        return CommandResult(quit=True)

    def context_used(self) -> int:
        """Tokens the conversation occupies in the context, as of the last reply."""
        reply = self.session.last_reply
        return reply.stats.prompt_tokens + reply.stats.new_tokens if reply and self.session.messages else 0


_HANDLERS = {"/system": Commands._system, "/set": Commands._set, "/show": Commands._show,
             "/history": Commands._history, "/reset": Commands._reset,
             "/clear": Commands._reset, "/undo": Commands._undo, "/retry": Commands._retry,
             "/restart": Commands._restart, "/save": Commands._save,
             "/load": Commands._load, "/stats": Commands._stats, "/think": Commands._think, "/help": Commands._help,
             "/quit": Commands._quit, "/exit": Commands._quit, "/bye": Commands._quit}


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class CommandCompleter(Completer):
    """Tab completion for slash commands, /set parameters, /think modes and /save, /load paths."""

    def __init__(self):
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        words = text.split()
        typing_first = len(words) <= 1 and not text.endswith(" ")
        current = "" if text.endswith(" ") else words[-1]
        if typing_first:
            yield from (Completion(n, -len(current)) for n in NAMES if n.startswith(current.lower()))
        elif words[0] == "/set" and len(words) - (not text.endswith(" ")) == 1:
            yield from (Completion(p, -len(current)) for p in PARAMETERS if p.startswith(current))
        elif words[0] == "/think" and len(words) - (not text.endswith(" ")) == 1:
            yield from (Completion(m, -len(current)) for m in ("show", "hide") if m.startswith(current))
        elif words[0] in ("/save", "/load"):
            yield from self._paths.get_completions(Document(current), complete_event)
