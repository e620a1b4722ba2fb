"""A reply streamed to the terminal: reasoning dimmed (or hidden), fenced code highlighted.

Pieces arrive in arbitrary cuts, so text that might be the start of a tag (`<think>`) or of a code
fence is held back until the next piece decides it; code is highlighted a whole line at a time.
"""
import re

from prompt_toolkit.formatted_text import (
    FormattedText,
    PygmentsTokens,
    to_formatted_text,
)
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from ..protocol.messages import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_STYLE = "fg:ansibrightblack italic"
FENCE_STYLE = "fg:ansibrightblack"
_FENCE = re.compile(r"^\s*```")
_FENCE_PREFIX = re.compile(r"^\s*`{0,3}$")


class StreamRenderer:
    """feed() text pieces as they arrive, then finish(); `write` receives formatted text fragments."""

    def __init__(self, write, show_thinking: bool = True):
        self._write, self.show_thinking = write, show_thinking
        self._pending = ""
        self._mode = "text"  # text | think | code
        self._lexer = None
        self._line_start = True  # whether _pending begins at the start of a line

    def feed(self, piece: str) -> None:
        """Render what can be rendered of the reply so far."""
        self._pending += piece
        self._drain(final=False)

    def finish(self) -> None:
        """Render everything held back; the reply is complete (or was stopped)."""
        self._drain(final=True)
        self._mode, self._lexer = "text", None

    def _drain(self, final: bool) -> None:
        while self._pending:
            if self._mode == "think":
                if not self._drain_think(final):
                    return
                continue
            if self._mode == "text":
                opening = self._pending.find(THINK_OPEN)
                if opening >= 0 and "\n" not in self._pending[:opening]:
                    self._emit_text(self._pending[:opening])
                    self._pending, self._mode = self._pending[opening + len(THINK_OPEN):], "think"
                    continue
            newline = self._pending.find("\n")
            if newline >= 0:
                line, self._pending = self._pending[: newline + 1], self._pending[newline + 1:]
                self._line(line)
                continue
            if final:
                line, self._pending = self._pending, ""
                self._line(line)
                return
            if self._mode == "code" or (self._line_start and (_FENCE_PREFIX.match(self._pending) or _FENCE.match(self._pending))):
                return  # a code line, or what may become a fence: wait for the line to end
            held = partial_suffix(self._pending, THINK_OPEN)
            self._emit_text(self._pending[: len(self._pending) - held])
            self._pending = self._pending[len(self._pending) - held:]
            return

    def _drain_think(self, final: bool) -> bool:
        """Render reasoning up to its closing tag; False when waiting for more text."""
        closing = self._pending.find(THINK_CLOSE)
        if closing >= 0:
            self._emit_think(self._pending[:closing].rstrip("\n") + "\n")  # the answer starts on a new line
            self._pending, self._mode = self._pending[closing + len(THINK_CLOSE):].lstrip("\n"), "text"
            self._line_start = True
            return True
        held = 0 if final else partial_suffix(self._pending, THINK_CLOSE)
        self._emit_think(self._pending[: len(self._pending) - held])
        self._pending = self._pending[len(self._pending) - held:]
        return False

    def _line(self, line: str) -> None:
        """A whole line (or the last, unfinished one): fences switch code mode, code is highlighted."""
        if self._line_start and _FENCE.match(line):
            if self._mode == "code":
                self._mode, self._lexer = "text", None
            else:
                self._mode, self._lexer = "code", _lexer(line.strip()[3:].strip())
            self._write(FormattedText([(FENCE_STYLE, line)]))
        elif self._mode == "code" and self._lexer is not None:
            self._write(to_formatted_text(PygmentsTokens(list(self._lexer.get_tokens(line)))))
        else:
            self._write(FormattedText([("", line)]))
        self._line_start = line.endswith("\n")

    def _emit_text(self, text: str) -> None:
        if text:
            self._write(FormattedText([("", text)]))
            self._line_start = text.endswith("\n")

    def _emit_think(self, text: str) -> None:
        if text and self.show_thinking:
            self._write(FormattedText([(THINK_STYLE, text)]))


def _lexer(language: str):
    """A pygments lexer for a fence's language tag, or None (then code is shown plain)."""
    try:
        return get_lexer_by_name(language or "text", stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None
