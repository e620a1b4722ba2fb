"""The stream link's two ends (client/stream_link.py and engine/stream_link.py) over real sockets."""
import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from llaisys_chat.client.stream_link import StreamLink
from llaisys_chat.engine.stream_link import ClientLink
from llaisys_chat.errors import LlaisysError
from llaisys_chat.protocol.link import done_message, hello_message, piece_message


@pytest.fixture(params=["unix", "tcp"])
def listener(request):
    link = StreamLink(local=request.param == "unix", advertised_host="127.0.0.1")
    assert link.address.startswith(request.param + ":")
    yield link
    link.close()


def rank0_sends(listener, request_id: str, text: str) -> None:
    """Rank 0 connects with the listener's token, and a piece it sends reaches the client."""
    rank0 = ClientLink()
    assert rank0.open(listener.address, listener.token)
    listener.wait_for_rank0(5, check=lambda: None)
    rank0.send(piece_message(request_id, text))
    assert receive_all(listener, 1)[0]["text"] == text
    rank0.close()


def test_a_connection_without_the_token_is_closed(listener):
    for first in (hello_message("wrong"), {"id": "r1", "text": "spoofed", "time": 0}, None):
        stranger = socket.socket(socket.AF_UNIX if listener.address.startswith("unix") else socket.AF_INET)
        kind, _, where = listener.address.partition(":")
        stranger.connect(where if kind == "unix" else (where.rpartition(":")[0], int(where.rpartition(":")[2])))
        if first is not None:
            stranger.sendall(json.dumps(first).encode() + b"\n")
        else:
            stranger.sendall(b"not json at all\n")
        with pytest.raises(LlaisysError, match="did not connect"):
            listener.wait_for_rank0(0.5, check=lambda: None)
        assert stranger.recv(16) == b""  # closed by the client
        stranger.close()
    rank0_sends(listener, "r1", "genuine")


def test_the_unix_socket_sits_in_a_folder_only_its_owner_can_enter():
    link = StreamLink(local=True)
    folder = Path(link.address.removeprefix("unix:")).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    link.close()
    assert not folder.exists()


def test_the_tcp_listener_binds_only_the_advertised_address():
    link = StreamLink(local=False, advertised_host="127.0.0.1")
    port = int(link.address.rpartition(":")[2])
    with pytest.raises(ConnectionRefusedError):  # another address of this machine (all-addresses would accept)
        socket.create_connection(("127.0.0.2", port), timeout=2)
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    link.close()
    with pytest.raises(LlaisysError, match="LLAISYS_CLIENT_IP"):
        StreamLink(local=False, advertised_host="192.0.2.1")  # not an address of this machine


def receive_all(link: StreamLink, count: int) -> list[dict]:
    messages, deadline = [], time.monotonic() + 5
    while len(messages) < count and time.monotonic() < deadline:
        messages += link.receive(0.05) or []
    return messages


def test_pieces_flow_to_the_client_and_stops_flow_back(listener):
    rank0 = ClientLink()
    assert rank0.open(listener.address, listener.token)
    listener.wait_for_rank0(5, check=lambda: None)
    assert rank0.send(piece_message("r1", "Hel")) and rank0.send(piece_message("r1", "lo")) and rank0.send(done_message("r1"))
    received = receive_all(listener, 3)
    assert [m.get("text") for m in received] == ["Hel", "lo", None] and received[2]["done"]
    assert not rank0.stop_requested("r1")
    assert listener.request_stop("r0") and listener.request_stop("r1")
    time.sleep(0.05)
    assert rank0.stop_requested("r1")  # a stop for another reply does not count, this one does
    rank0.close()


def test_a_client_that_goes_away_stops_the_reply(listener):
    rank0 = ClientLink()
    assert rank0.open(listener.address, listener.token)
    listener.wait_for_rank0(5, check=lambda: None)
    listener.close()
    time.sleep(0.05)
    assert rank0.stop_requested("r1")
    assert not rank0.send(piece_message("r1", "anyone?"))


def test_rank0_reconnects_after_its_connection_closed(listener):
    first = ClientLink()
    assert first.open(listener.address, listener.token) and first.open(listener.address, listener.token)  # kept, not reopened
    listener.wait_for_rank0(5, check=lambda: None)
    first.close()
    assert listener.receive(1) is None
    rank0_sends(listener, "r2", "again")  # a new connection


def test_waiting_for_rank0_gives_up_and_reports(listener):
    with pytest.raises(LlaisysError, match="rank 0 did not connect within 0 s"):
        listener.wait_for_rank0(0.1, check=lambda: None)
    def reply_failed():
        raise RuntimeError("the reply failed")

    with pytest.raises(RuntimeError, match="the reply failed"):
        listener.wait_for_rank0(5, check=reply_failed)
    assert not listener.request_stop("r1")  # nobody to tell: the caller signals rank 0 instead


def test_an_unreachable_client_is_reported_not_raised():
    assert not ClientLink().open("unix:/nonexistent/llaisys.sock", "token")
    assert ClientLink().stop_requested("r1")
