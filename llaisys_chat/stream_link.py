"""The line between a client and rank 0: one stream socket, newline-delimited JSON each way.

Rank 0 sends each text piece the moment it exists and reads stop requests between steps; the client
binds, rank 0 connects. A plain socket, written and read by the threads that produce and consume the
messages, wakes one thread per token: on a machine whose cores are all busy with ranks, every extra
wake-up (a messaging library's I/O threads) preempts a rank that the others then wait for.
"""
import json
import os
import select
import socket
import tempfile
import uuid
from pathlib import Path


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


class Listener:
    """The client's end: a socket that rank 0 connects to (a Unix socket when rank 0 is local)."""

    def __init__(self, local: bool, advertised_host: str | None = None):
        if local:
            self._path = Path(tempfile.gettempdir()) / f"llaisys-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(self._path))
            self.address = f"unix:{self._path}"
        else:
            self._path = None
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("0.0.0.0", 0))
            self.address = f"tcp:{advertised_host}:{self.sock.getsockname()[1]}"
        self.sock.listen(1)

    def accept(self, timeout: float) -> Link | None:
        """The next connection within timeout seconds, or None."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return None
        connection, _ = self.sock.accept()
        return Link(connection)

    def close(self) -> None:
        """Stop listening (and remove the Unix socket's file)."""
        self.sock.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


def connect(address: str) -> Link:
    """Rank 0's end: connect to a client's Listener address ('unix:PATH' or 'tcp:HOST:PORT')."""
    kind, _, where = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)
    else:
        host, _, port = where.rpartition(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a piece is a few bytes: send it now
    return Link(sock)
