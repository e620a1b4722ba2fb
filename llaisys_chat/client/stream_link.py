"""The client's end of the stream link: a socket that rank 0 connects to, and the connection it
makes, kept between replies (wire format: protocol/link.py).

A plain socket, written and read by the threads that produce and consume the messages, wakes one
thread per token: on a machine whose cores are all busy with ranks, every extra wake-up (a messaging
library's I/O threads) preempts a rank that the others then wait for.
"""
import os
import select
import socket
import tempfile
import time
import uuid
from pathlib import Path

from ..errors import LlaisysError
from ..protocol.link import Link, stop_message


class StreamLink:
    """Where rank 0 streams to this client: a listener (a Unix socket when every rank is on this
    machine, else TCP on `advertised_host`) and rank 0's connection once it has made one."""

    def __init__(self, local: bool, advertised_host: str | None = None):
        if local:
            self._path = Path(tempfile.gettempdir()) / f"llaisys-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(str(self._path))
            self.address = f"unix:{self._path}"
        else:
            self._path = None
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.bind(("0.0.0.0", 0))
            self.address = f"tcp:{advertised_host}:{self._sock.getsockname()[1]}"
        self._sock.listen(1)
        self._link: Link | None = None

    def wait_for_rank0(self, timeout: float, check) -> None:
        """Until rank 0 is connected: accept its connection, calling check() (which raises if the
        reply has failed) between polls; LlaisysError after timeout seconds."""
        deadline = time.monotonic() + timeout
        while self._link is None:
            self._accept(0.05)
            if self._link is None:
                check()
                if time.monotonic() > deadline:
                    raise LlaisysError(f"rank 0 did not connect within {timeout:.0f} s")

    def receive(self, timeout: float) -> list[dict] | None:
        """Messages from rank 0 within timeout seconds ([] if none); None if its connection closed
        (a new rank 0, or one that failed: the caller waits for the next connection)."""
        messages = self._link.receive(timeout) if self._link is not None else None
        if messages is None:
            self.drop_connection()
        return messages

    def request_stop(self, request_id: str) -> bool:
        """Ask rank 0 to stop a reply; False when it is not connected (the caller then signals it)."""
        if self._link is None:
            self._accept(0.05)
        if self._link is None:
            return False
        try:
            self._link.send(stop_message(request_id))
            return True
        except OSError:
            self.drop_connection()
            return False

    def drop_connection(self) -> None:
        """Forget rank 0's connection (after a restart, the new rank 0 connects anew)."""
        if self._link is not None:
            self._link.close()
            self._link = None

    def close(self) -> None:
        """Stop listening (and remove the Unix socket's file)."""
        self.drop_connection()
        self._sock.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    def _accept(self, timeout: float) -> None:
        if select.select([self._sock], [], [], timeout)[0]:
            self._link = Link(self._sock.accept()[0])
