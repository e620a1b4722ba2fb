"""Rank 0's end of the stream link: it connects to the client, sends each text piece the moment it
exists, and reads the client's stop requests (and requests joining a batch) between decode steps
(wire format: protocol/link.py).

The connection is kept between replies while the client (its address) stays the same. If the client
cannot be reached or goes away, the reply stops at the next step: nobody would read the rest.
"""
import socket

from ..protocol.link import Link, hello_message


class ClientLink:
    """Rank 0's connection to the client that asked for the current reply."""

    def __init__(self):
        self._address: str | None = None
        self._link: Link | None = None

    def open(self, address: str, token: str) -> bool:
        """Be connected to the client at `address`, having presented its token; False if it cannot
        be reached."""
        if self._link is not None and self._address == address:
            return True
        self.close()
        try:
            self._link, self._address = Link(_connect(address)), address
            self._link.send(hello_message(token))
        except OSError:
            self.close()
            return False
        return True

    def send(self, message: dict) -> bool:
        """Send a message to the client; False (and the link closed) if the client has gone."""
        if self._link is None:
            return False
        try:
            self._link.send(message)
        except OSError:
            self.close()
            return False
        return True

    def stop_requested(self, request_id: str) -> bool:
        """Whether the client asked to stop this reply, or has gone; never waits."""
        messages = self.messages()
        return messages is None or any(m.get("stop") == request_id for m in messages)

    def messages(self) -> list[dict] | None:
        """What the client has sent since the last look ([] if nothing), or None if it has gone; never waits."""
        messages = self._link.receive(0) if self._link is not None else None
        if messages is None:
            self.close()
        return messages

    def close(self) -> None:
        """Drop the connection (a new one is made for the next reply)."""
        if self._link is not None:
            self._link.close()
        self._link = self._address = None


def _connect(address: str) -> socket.socket:
    """A socket connected to a client's listener address ('unix:PATH' or 'tcp:HOST:PORT')."""
    kind, _, where = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)
        return sock
    host, _, port = where.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a piece is a few bytes: send it now
    return sock
