"""Replies for several callers at once, decoded together on the engines (the worker's generate_batch).

One thread of its own drives the engines: it starts a batch call with the requests waiting, sends
the requests that arrive while it runs to rank 0 over the stream link (they join the batch at the
next step), and hands each reply's pieces and end to the callbacks its caller gave. Rank 0 reads a
joining request only between steps; one that reaches it after the batch's last step is sent again
with the next call (rank 0 ignores a request it has already taken).
"""
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from ..errors import LlaisysError
from ..protocol.reply import GenerationStats, Reply
from ..protocol.request import ReplyRequest
from .ranks import POLL_SECONDS, user_error


@dataclass
class _Submitted:
    request: ReplyRequest
    on_piece: Callable[[str], None]
    on_end: Callable[[Reply | None, Exception | None], None]
    text: str = ""


class BatchedReplies:
    """submit() replies that the engines decode together; callbacks run on this object's thread."""

    def __init__(self, ready_ranks, stream_link, token_timeout: float):
        self._ready_ranks, self._stream_link, self._token_timeout = ready_ranks, stream_link, token_timeout
        self._lock = threading.Condition()
        self._new: list[_Submitted] = []   # submitted, not yet sent to the engines
        self._stops: list[str] = []
        self._closed = False
        self._thread = threading.Thread(target=self._drive, name="llaisys-batched-replies", daemon=True)
        self._thread.start()

    def submit(self, request: ReplyRequest, on_piece: Callable[[str], None],
               on_end: Callable[[Reply | None, Exception | None], None]) -> None:
        """Start a reply: on_piece(text) for each piece, then on_end(reply, None), or on_end(None, error)."""
        with self._lock:
            if self._closed:
                raise LlaisysError("the batched replies are closed")
            self._new.append(_Submitted(request, on_piece, on_end))
            self._lock.notify()

    def stop(self, request_id: str) -> None:
        """Stop a reply at the engines' next step (its end still comes, with the text so far)."""
        with self._lock:
            self._stops.append(request_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=5)

    # -- the driving thread ------------------------------------------------------------------------

    def _drive(self) -> None:
        waiting: list[_Submitted] = []  # to start with the next call
        while True:
            with self._lock:
                while not (self._new or waiting or self._closed):
                    self._lock.wait()
                if self._closed:
                    break
                waiting += self._new
                self._new = []
            waiting = self._run_call(waiting)

    def _run_call(self, starting: list[_Submitted]) -> list[_Submitted]:
        """One batch call, from its first requests to its end; returns the requests it left unanswered."""
        outstanding = {s.request.id: s for s in starting}
        try:
            ranks, link = self._ready_ranks(), self._stream_link()
            call = ranks.call_worker("generate_batch", [replace(s.request, stream_to=link.address,
                                                                stream_token=link.token) for s in starting])
            last_progress = time.monotonic()
            while True:
                self._send_news(link, outstanding)
                finished = call.ready()  # before reading: what rank 0 sent before it returned is then here
                messages = link.receive(0 if finished else POLL_SECONDS)
                if messages:
                    last_progress = time.monotonic()
                    self._route(messages, outstanding)
                    continue
                # Not connected: rank 0 connects at the start of a call when it last served another
                # client (which also ends the connection it had to this one).
                if messages is None and link.accept(0 if finished else POLL_SECONDS):
                    continue
                if finished:
                    break
                ranks.check(call)
                if outstanding and time.monotonic() - last_progress > self._token_timeout:
                    raise LlaisysError(f"no progress from the engines for {self._token_timeout:.0f} s; "
                                       f"call restart() if they are stuck")
            call.get(self._token_timeout)  # raises what failed
        except Exception as e:  # EnginesDown, a failed call...: every reply of the call ends with it
            error = e if isinstance(e, LlaisysError) else user_error(e)
            for s in outstanding.values():
                s.on_end(Reply(s.text, stats=GenerationStats(finish_reason="error")) if s.text else None, error)
            return []
        with self._lock:  # requests that came too late for this call, and were not sent
            late, self._new = self._new, []
        return list(outstanding.values()) + late

    def _send_news(self, link, outstanding: dict) -> None:
        """Send rank 0 the requests submitted meanwhile (to join) and the stops asked for."""
        with self._lock:
            new, self._new = self._new, []
            stops, self._stops = self._stops, []
        for s in new:
            outstanding[s.request.id] = s
            link.request_join(s.request.to_dict())
        for request_id in stops:
            link.request_stop(request_id)

    def _route(self, messages: list[dict], outstanding: dict) -> None:
        for message in messages:
            s = outstanding.get(message.get("id"))
            if s is None:
                continue  # left over from an earlier, abandoned reply
            if not message.get("done"):
                s.text += message["text"]
                s.on_piece(message["text"])
                continue
            del outstanding[s.request.id]
            if "error" in message:
                s.on_end(None, LlaisysError(message["error"]))
            else:
                s.on_end(Reply(s.text, new_ids=message["new_ids"], stats=GenerationStats.from_dict(message["stats"])), None)
