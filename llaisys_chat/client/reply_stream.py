"""A reply in progress, as the client sees it: text pieces arriving from rank 0 over the stream link,
while the ranks are watched for failure."""
import time
from dataclasses import replace

from ..errors import EnginesDown, LlaisysError
from ..protocol.reply import GenerationStats, Reply
from ..protocol.request import ReplyRequest
from .ranks import POLL_SECONDS, user_error

STOP_TIMEOUT = 30.0  # seconds for the engines to wind down after a stop


class ReplyStream:
    """Iterate for text pieces; `.reply` holds the result once finished; `.stop()` (or Ctrl-C while
    iterating) ends it on every rank at the same step, keeping the text so far. `.delays` records,
    per piece, seconds from the engine choosing it to its arrival here."""

    def __init__(self, request: ReplyRequest, ranks, link, token_timeout: float):
        self._request = replace(request, stream_to=link.address, stream_token=link.token)
        self._ranks, self._link, self._token_timeout = ranks, link, token_timeout
        self.reply: Reply | None = None
        self.text = ""
        self.delays: list[float] = []
        self.first_piece_seconds: float | None = None
        self._call = None

    def __iter__(self):
        if self._call is not None:
            raise LlaisysError("a reply stream can be iterated only once")
        start = time.monotonic()
        self._call = self._ranks.call_worker("generate", self._request)
        try:
            yield from self._receive(start)
        except (KeyboardInterrupt, GeneratorExit):
            self.stop()
            self._finish(interrupted=True)
            raise
        except EnginesDown:
            if self.text:  # what the user has read stays: the reply, cut short
                self.reply = Reply(self.text, stats=GenerationStats(finish_reason="error"))
            raise
        self._finish(interrupted=False)

    def stop(self) -> None:
        """Ask the engines to stop this reply (they stop together at their next step)."""
        if self._call is None or self._call.ready():
            return
        if not self._link.request_stop(self._request.id):  # rank 0 has not connected yet
            self._ranks.interrupt_rank0()

    def _check(self) -> None:
        self._ranks.check(self._call)

    def _receive(self, start: float):
        """Yield pieces until rank 0 says done; meanwhile watch for failed or dead engines."""
        self._link.wait_for_rank0(self._token_timeout, self._check)
        last_progress = time.monotonic()
        while True:
            messages = self._link.receive(POLL_SECONDS)
            if messages is None:  # a connection from an earlier rank 0: this one connects anew, or has failed
                self._link.wait_for_rank0(self._token_timeout, self._check)
                continue
            for message in messages:
                if message["id"] != self._request.id:
                    continue  # left over from an earlier, abandoned reply
                if message.get("done"):
                    return
                if self.first_piece_seconds is None:
                    self.first_piece_seconds = time.monotonic() - start
                self.delays.append(time.time() - message["time"])
                self.text += message["text"]
                last_progress = time.monotonic()
                yield message["text"]
            if not messages:
                self._check()
                if time.monotonic() - last_progress > self._token_timeout:
                    raise LlaisysError(f"no progress from the engines for {self._token_timeout:.0f} s; "
                                       f"call restart() if they are stuck")

    def _finish(self, interrupted: bool) -> None:
        """Collect rank 0's reply once every rank has finished."""
        try:
            reply = self._call.get(STOP_TIMEOUT if interrupted else self._token_timeout)[0]
        except Exception as e:
            if interrupted:
                self.reply = Reply(self.text, stats=GenerationStats(finish_reason="interrupted"))
                return
            raise user_error(e) from None
        if self.first_piece_seconds is not None:
            reply.stats.first_token_seconds = self.first_piece_seconds
        self.reply = reply
