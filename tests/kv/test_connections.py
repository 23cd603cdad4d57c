"""Side-channel connections kept open between pulls: reused while in step, replaced when
the server closed them, never reused after a pull that failed half-way."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from shuffleinfer.kv import tcp
from shuffleinfer.kv.channel import KVServer, recv_frame, send_frame
from shuffleinfer.kv.connections import ConnectionPool
from shuffleinfer.kv.shm import ShmTransport
from shuffleinfer.kv.tcp import TcpTransport
from shuffleinfer.kv.transport import KVTransferError, PullRequest
from tests.kv.conftest import FakeSource

pytestmark = pytest.mark.timeout(30)

BLOCKS = {0: bytearray(b"a" * 70_000), 1: bytearray(b"b" * 130_000)}


@contextmanager
def _server(source: FakeSource, io_timeout_s: float = 10.0) -> Iterator[KVServer]:
    transports = {"tcp": TcpTransport(), "shm": ShmTransport()}
    server = KVServer("127.0.0.1", 0, source, transports, io_timeout_s=io_timeout_s)
    server.start()
    try:
        yield server
    finally:
        server.close()
        for transport in transports.values():
            transport.close()


def _pull(server: KVServer, pool: ConnectionPool, tid: str, sizes: tuple[int, ...] = (),
          timeout_s: float = 5.0) -> list[bytearray]:
    block_ids = (0, 1)
    dest = [bytearray(size) for size in sizes or [len(BLOCKS[b]) for b in block_ids]]
    host, port = server.address
    tcp.pull(host, port, PullRequest(tid, block_ids, {}), [memoryview(d) for d in dest],
             timeout_s, connections=pool)
    return dest


def _wait_for(condition: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.02)
    return False


def test_pulls_and_a_refusal_share_one_connection() -> None:
    source = FakeSource(dict(BLOCKS))
    pool = ConnectionPool()
    with _server(source) as server:
        for i in range(3):
            assert _pull(server, pool, f"t{i}") == [BLOCKS[0], BLOCKS[1]]
        source.refuse = "no lease for t3"
        with pytest.raises(KVTransferError, match="no lease for t3"):
            _pull(server, pool, "t3")
        source.refuse = None
        assert _pull(server, pool, "t4") == [BLOCKS[0], BLOCKS[1]]
        assert server.num_connections == 1
    pool.close()
    assert [tid for tid, ok in source.done if ok] == ["t0", "t1", "t2", "t4"]


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    source = FakeSource(dict(BLOCKS))
    pool = ConnectionPool()
    with _server(source, io_timeout_s=0.3) as server:
        _pull(server, pool, "t0")
        assert _wait_for(lambda: server.num_connections == 0), "idle connection kept open"
        assert _pull(server, pool, "t1") == [BLOCKS[0], BLOCKS[1]]
    pool.close()
    assert source.done == [("t0", True), ("t1", True)]


def test_a_pull_that_failed_half_way_does_not_leave_its_connection_to_the_next() -> None:
    source = FakeSource(dict(BLOCKS))
    pool = ConnectionPool()
    with _server(source) as server:
        # The client expects more bytes than the server sends: it times out half-way,
        # with the stream out of step. The next pull must not read the leftovers.
        with pytest.raises(KVTransferError):
            _pull(server, pool, "short", sizes=(70_000, 130_001), timeout_s=0.3)
        assert _pull(server, pool, "t1") == [BLOCKS[0], BLOCKS[1]]


def test_closing_a_server_ends_the_connections_clients_keep_open() -> None:
    source = FakeSource(dict(BLOCKS))
    pool = ConnectionPool()
    with _server(source) as server:
        _pull(server, pool, "t0")
        assert server.num_connections == 1
        server.close()
        assert _wait_for(lambda: server.num_connections == 0)
    pool.close()


def test_idle_connections_older_than_idle_s_are_not_reused() -> None:
    source = FakeSource(dict(BLOCKS))
    pool = ConnectionPool(idle_s=0.1)
    with _server(source) as server:
        _pull(server, pool, "t0")
        time.sleep(0.3)
        _pull(server, pool, "t1")
        # The old one was closed by the pool, not merely left: the server sees it go.
        assert _wait_for(lambda: server.num_connections == 1)
    pool.close()


def test_a_repeated_frame_reads_as_a_fresh_object_each_time() -> None:
    """Small frames are parsed once per distinct body; a caller that changes what it got
    must not change what the next reader of the same bytes gets."""
    a, b = socket.socketpair()
    with a, b:
        for _ in range(2):
            send_frame(a, {"ok": True, "error": None, "cache": {"id": "c1"}})
        first = recv_frame(b)
        first["ok"] = False
        assert recv_frame(b) == {"ok": True, "error": None, "cache": {"id": "c1"}}
        send_frame(a, {"ok": True, "big": "x" * 1000})  # past the memo's size: parsed anew
        assert recv_frame(b)["big"] == "x" * 1000
