"""The KV server's shared secret: a request without the right token is refused before it
touches a lease, logged and counted; the right token still works afterwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shuffleinfer.kv import channel, tcp
from shuffleinfer.kv.shm import ShmTransport
from shuffleinfer.kv.transport import KVTransferError, Peer, PullRequest
from tests.kv.conftest import FakeSource, serve

pytestmark = pytest.mark.timeout(30)

TOKEN = "correct horse battery staple"
Pull = Callable[..., int]


def _shm_pull(host: str, port: int, request: PullRequest, dest: list[memoryview],
              timeout_s: float, auth_token: str | None) -> int:
    """`tcp.pull`'s signature over a decode-side shm transport of its own."""
    transport = ShmTransport(auth_token)
    try:
        return transport.pull_views(Peer(host, port), request, dest, timeout_s)
    finally:
        transport.close()


@pytest.mark.parametrize("pull", [tcp.pull, _shm_pull], ids=["tcp", "shm"])
@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + " "],
                         ids=["missing", "wrong", "prefix", "suffix"])
def test_pull_without_the_token_is_refused_and_the_lease_untouched(
        pull: Pull, token: str | None, caplog: pytest.LogCaptureFixture) -> None:
    source = FakeSource({0: bytearray(b"k" * 64)})
    dest = bytearray(64)
    with serve(source, auth_token=TOKEN) as (host, port):
        with caplog.at_level("WARNING", logger="shuffleinfer.kv.channel"):
            with pytest.raises(KVTransferError, match="unauthorized"):
                pull(host, port, PullRequest("t", (0,), {}), [memoryview(dest)],
                     timeout_s=5, auth_token=token)
        assert source.requests == [] and source.done == []  # the lease was never looked at
        assert len(source.unauthorized) == 1
        assert "auth token" in caplog.text
        assert dest == bytearray(64)

        assert pull(host, port, PullRequest("t", (0,), {}), [memoryview(dest)],
                    timeout_s=5, auth_token=TOKEN) == 64
        assert source.done_event.wait(5)  # the server ends the lease after its reply
    assert dest == source.blocks[0]
    assert source.done == [("t", True)]


def test_release_without_the_token_is_refused() -> None:
    source = FakeSource({})
    with serve(source, auth_token=TOKEN) as (host, port):
        with pytest.raises(KVTransferError, match="unauthorized"):
            channel.release(host, port, "lease-1", timeout_s=5)
        assert source.released == []
        channel.release(host, port, "lease-1", timeout_s=5, auth_token=TOKEN)
    assert source.released == ["lease-1"]


@pytest.mark.parametrize("header", [
    {"op": "pull", "auth_token": 12345},
    {"op": "pull", "auth_token": ["correct horse battery staple"]},
    {"op": "connect", "transport": "nccl"},
    {"op": "release", "transfer_id": "x", "auth_token": ""},
])
def test_malformed_or_missing_tokens_of_any_op_are_refused(header: dict[str, Any]) -> None:
    source = FakeSource({})
    with serve(source, auth_token=TOKEN) as (host, port):
        with channel.connect(Peer(host, port), 5) as sock:
            channel.send_frame(sock, header)
            reply = channel.recv_frame(sock)
    assert reply == {"ok": False, "error": "unauthorized: wrong or missing auth_token"}
    assert len(source.unauthorized) == 1 and source.released == []


def test_server_without_a_token_ignores_one_sent() -> None:
    source = FakeSource({0: bytearray(b"q" * 8)})
    dest = bytearray(8)
    with serve(source) as (host, port):
        tcp.pull(host, port, PullRequest("t", (0,), {}), [memoryview(dest)], timeout_s=5,
                 auth_token="anything")
    assert dest == source.blocks[0] and source.unauthorized == []


def test_unknown_transport_is_refused_naming_the_served_ones() -> None:
    source = FakeSource({0: bytearray(8)})
    with serve(source) as (host, port):
        with channel.connect(Peer(host, port), 5) as sock:
            channel.send_frame(sock, {"op": "pull", "transport": "carrier-pigeon",
                                      "transfer_id": "t", "block_ids": [0]})
            reply = channel.recv_frame(sock)
    assert reply["ok"] is False
    assert "carrier-pigeon" in reply["error"] and "['shm', 'tcp']" in reply["error"]
    assert source.requests == []


def test_the_local_listener_asks_for_the_token_too() -> None:
    source = FakeSource({0: bytearray(b"k" * 64)})
    server = channel.KVServer("127.0.0.1", 0, source, {"shm": ShmTransport(TOKEN)},
                              auth_token=TOKEN)
    server.start()
    try:
        header = {"op": "pull", "transport": "shm", "transfer_id": "t", "block_ids": [0],
                  "layout": {}, "cache_ok": True}
        with channel.connect_local(server.local_name, 5) as sock:
            with pytest.raises(KVTransferError, match="unauthorized"):
                channel.exchange(sock, header, None)
        assert source.requests == [] and len(source.unauthorized) == 1
        assert source.unauthorized == ["a local client"]
        with channel.connect_local(server.local_name, 5) as sock:
            channel.exchange(sock, {"op": "release", "transfer_id": "t"}, TOKEN)
        assert source.released == ["t"]
    finally:
        server.close()
