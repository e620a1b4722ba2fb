"""The stream link's wire format: one stream socket between a client and rank 0, carrying JSON
objects one per line, each way.

Rank 0 -> client: first a hello presenting the link's token (the client closes a connection that
does not), then text pieces of replies, the moment they exist, each reply's end.
Client -> rank 0: a request to stop a reply, and (while a batch of replies runs) requests that
join it; both are read between decode steps.
"""
import json
import secrets
import select
import socket
import time


def hello_message(token: str) -> dict:
    """The first message on a connection: the secret the client gave the ranks for its link."""
    return {"hello": token}


def piece_message(request_id: str, text: str) -> dict:
    """A piece of a reply's text; `time` lets the client measure the delay to its arrival."""
    return {"id": request_id, "text": text, "time": time.time()}


def done_message(request_id: str, **outcome) -> dict:
    """The reply has ended: no more pieces follow. A batched reply's end carries its outcome:
    `stats` and `new_ids`, or `error` (a one-line message) if it could not run."""
    return {"id": request_id, "done": True, **outcome}


def join_message(request: dict) -> dict:
    """A request (ReplyRequest.to_dict()) to decode along with the batch that is running."""
    return {"join": request}


def stop_message(request_id: str) -> dict:
    """Stop this reply on every rank at the next step."""
    return {"stop": request_id}


class Link:
    """A connected stream socket carrying JSON messages, one per line."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._partial = b""
        self._queued: list[dict] = []

    def send(self, message: dict) -> None:
        """Send one message (raises OSError if the other side is gone)."""
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, timeout: float) -> list[dict] | None:
        """The messages that arrive within timeout seconds ([] if none), or None once the other side closed."""
        if self._queued:
            messages, self._queued = self._queued, []
            return messages
        try:
            if not select.select([self.sock], [], [], timeout)[0]:
                return []
            data = self.sock.recv(1 << 16)
        except OSError:  # reset by a peer that died
            return None
        if not data:
            return None
        *lines, self._partial = (self._partial + data).split(b"\n")
        try:
            return [json.loads(line) for line in lines]
        except ValueError:  # not this protocol: treat the connection as broken
            return None

    def greeted(self, token: str, timeout: float) -> bool:
        """Whether the first message, within timeout seconds, is a hello presenting `token` (the
        messages after it stay queued for receive())."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.receive(max(0.0, deadline - time.monotonic()))
            if messages:
                self._queued, first = messages[1:], messages[0]
                presented = first.get("hello") if isinstance(first, dict) else None
                # compare_digest: the time taken tells a stranger nothing about the token.
                return isinstance(presented, str) and secrets.compare_digest(presented, token)
            if messages is None or time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
