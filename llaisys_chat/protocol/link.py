"""The stream link's wire format: one stream socket between a client and rank 0, carrying JSON
objects one per line, each way.

Rank 0 -> client: a text piece of a reply, the moment it exists, then the reply's end.
Client -> rank 0: a request to stop a reply, read between decode steps.
"""
import json
import select
import socket
import time


def piece_message(request_id: str, text: str) -> dict:
    """A piece of a reply's text; `time` lets the client measure the delay to its arrival."""
    return {"id": request_id, "text": text, "time": time.time()}


def done_message(request_id: str) -> dict:
    """The reply has ended: no more pieces follow."""
    return {"id": request_id, "done": True}


def stop_message(request_id: str) -> dict:
    """Stop this reply on every rank at the next step."""
    return {"stop": request_id}


class Link:
    """A connected stream socket carrying JSON messages, one per line."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._partial = b""

    def send(self, message: dict) -> None:
        """Send one message (raises OSError if the other side is gone)."""
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, timeout: float) -> list[dict] | None:
        """The messages that arrive within timeout seconds ([] if none), or None once the other side closed."""
        try:
            if not select.select([self.sock], [], [], timeout)[0]:
                return []
            data = self.sock.recv(1 << 16)
        except OSError:  # reset by a peer that died
            return None
        if not data:
            return None
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
