"""The client's end of the stream link: a socket that rank 0 connects to, and the connection it
makes, kept between replies (wire format: protocol/link.py).

A plain socket, written and read by the threads that produce and consume the messages, wakes one
thread per token: on a machine whose cores are all busy with ranks, every extra wake-up (a messaging
library's I/O threads) preempts a rank that the others then wait for.

The link is private: a connection must present, first thing, a random token that this client sends
the ranks with each request (over ipyparallel, which the cluster's key authenticates); any other is
closed. The Unix socket lives in a folder only its owner can enter, and the TCP listener binds the
one address it advertises.
"""
import secrets
import select
import shutil
import socket
import tempfile
import time
from pathlib import Path

from ..errors import LlaisysError
from ..protocol.link import Link, join_message, stop_message

HELLO_TIMEOUT = 2.0  # seconds a new connection has to present the token


class StreamLink:
    """Where rank 0 streams to this client: a listener (a Unix socket when every rank is on this
    machine, else TCP on `advertised_host`) and rank 0's connection once it has made one."""

    def __init__(self, local: bool, advertised_host: str | None = None):
        self.token = secrets.token_hex(16)
        if local:
            self._folder = Path(tempfile.mkdtemp(prefix="llaisys-"))  # mode 0700
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(str(self._folder / "stream.sock"))
            self.address = f"unix:{self._folder / 'stream.sock'}"
        else:
            self._folder = None
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self._sock.bind((advertised_host, 0))
            except OSError as e:
                raise LlaisysError(f"cannot listen on {advertised_host} for the ranks' replies ({e.strerror}); "
                                   f"set LLAISYS_CLIENT_IP to an address of this machine that they can reach") from None
            self.address = f"tcp:{advertised_host}:{self._sock.getsockname()[1]}"
        self._sock.listen(4)
        self._link: Link | None = None

    def wait_for_rank0(self, timeout: float, check) -> None:
        """Until rank 0 is connected: accept its connection, calling check() (which raises if the
        reply has failed) between polls; LlaisysError after timeout seconds."""
        deadline = time.monotonic() + timeout
        while not self.accept(0.05):
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
        return self._send(stop_message(request_id))

    def request_join(self, request: dict) -> bool:
        """Send rank 0 a request (ReplyRequest.to_dict()) to join the running batch; False when it
        is not connected."""
        return self._send(join_message(request))

    def _send(self, message: dict) -> bool:
        if not self.accept(0.05):
            return False
        try:
            self._link.send(message)
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
        """Stop listening (and remove the Unix socket's folder)."""
        self.drop_connection()
        self._sock.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def accept(self, timeout: float) -> bool:
        """Whether rank 0 is connected, taking its waiting connection (within timeout seconds) if
        it is not; a connection that does not present the token is closed."""
        if self._link is None and select.select([self._sock], [], [], timeout)[0]:
            link = Link(self._sock.accept()[0])
            if link.greeted(self.token, HELLO_TIMEOUT):
                self._link = link
            else:
                link.close()
        return self._link is not None
