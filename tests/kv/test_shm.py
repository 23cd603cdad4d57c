"""The shm transport over a real KV server and real /dev/shm segments: bytes land exactly,
refusals carry the server's reason, and no segment is left behind on any path."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from shuffleinfer.kv import shm
from shuffleinfer.kv.channel import connect, recv_frame, send_frame
from shuffleinfer.kv.transport import KVTransferError, Peer, PullRequest
from tests.kv.conftest import FakeSource, serve, shm_segments

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test here ends with /dev/shm as it found it."""
    before = shm_segments()
    yield
    deadline = time.monotonic() + 2  # a server thread may still be closing its mapping
    while shm_segments() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shm_segments() - before == set(), "leaked shared-memory segments"


def _blocks(seed: int, sizes: list[int]) -> dict[int, bytearray]:
    rng = random.Random(seed)
    return {i: bytearray(rng.randbytes(size)) for i, size in enumerate(sizes)}


def test_pull_through_shared_memory_fills_odd_sized_views_exactly() -> None:
    rng = random.Random(0)
    sizes = [rng.choice([0, 1, 7, 1021, 4099, 65_537, 300_001]) for _ in range(600)]
    source = FakeSource(_blocks(1, sizes))
    wanted = tuple(rng.sample(range(len(sizes)), 500))
    dest = {b: bytearray(sizes[b]) for b in wanted}
    with serve(source) as (host, port):
        nbytes = shm.pull(host, port, PullRequest("t1", wanted, {"k": 1}),
                          [memoryview(dest[b]) for b in wanted], timeout_s=10)
    assert nbytes == sum(sizes[b] for b in wanted)
    assert all(dest[b] == source.blocks[b] for b in wanted)
    assert source.done_event.wait(5)  # the server ends the lease after its reply
    assert source.requests == [PullRequest("t1", wanted, {"k": 1})]
    assert source.done == [("t1", True)]


def test_refused_pull_raises_with_the_reason_and_leaves_no_segment() -> None:
    source = FakeSource({0: bytearray(b"x" * 10)}, refuse="no lease for transfer t")
    dest = bytearray(10)
    with serve(source) as (host, port):
        with pytest.raises(KVTransferError, match="no lease for transfer t"):
            shm.pull(host, port, PullRequest("t", (0,), {}), [memoryview(dest)], timeout_s=5)
    assert dest == bytearray(10)
    assert source.done == []  # refused before the grant: nothing to end


def test_unreachable_server_leaves_no_segment() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    host, port = listener.getsockname()[:2]
    listener.close()
    with pytest.raises(KVTransferError, match="t-gone"):
        shm.pull(host, port, PullRequest("t-gone", (0,), {}), [memoryview(bytearray(4))],
                 timeout_s=1)


def test_server_that_never_replies_times_out_and_leaves_no_segment() -> None:
    # A raw server that reads the header (so the segment exists) and then says nothing.
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            recv_frame(conn)
            stop.wait(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(KVTransferError, match="t-stall"):
            shm.pull(*listener.getsockname()[:2], PullRequest("t-stall", (0,), {}),
                     [memoryview(bytearray(1 << 20))], timeout_s=0.5)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert time.monotonic() - started < 5


def test_slow_source_times_the_client_out_and_still_leaks_nothing() -> None:
    # The server has opened (and unlinked) the segment when the client gives up.
    class SlowSource(FakeSource):
        def views_for_pull(self, request: PullRequest) -> list[memoryview]:
            time.sleep(1.0)
            return super().views_for_pull(request)

    source = SlowSource({0: bytearray(b"z" * 4096)})
    with serve(source) as (host, port):
        with pytest.raises(KVTransferError, match="t-slow"):
            shm.pull(host, port, PullRequest("t-slow", (0,), {}),
                     [memoryview(bytearray(4096))], timeout_s=0.3)
        assert source.done_event.wait(5)
    # The copy went into a segment nobody reads any more: the lease is over either way.
    assert [tid for tid, _ in source.done] == ["t-slow"]


def _raw_pull(host: str, port: int, extra: dict[str, object]) -> dict[str, object]:
    with connect(Peer(host, port), 5) as sock:
        send_frame(sock, {"op": "pull", "transport": "shm", "transfer_id": "t-raw",
                          "block_ids": [0], "layout": {}} | extra)
        return recv_frame(sock)


@pytest.mark.parametrize("name", ["../../etc/passwd", "shuffleinfer-kv-1-zz", 7, None,
                                  "shuffleinfer-kv-1-" + "0" * 32 + "/x"])
def test_server_refuses_segment_names_it_did_not_mint(name: object) -> None:
    source = FakeSource({0: bytearray(16)})
    with serve(source) as (host, port):
        reply = _raw_pull(host, port, {"shm_name": name, "shm_bytes": 16})
    assert reply["ok"] is False and "shm segment" in str(reply["error"])
    assert source.requests == []  # refused before the lease was looked at


def test_server_refuses_a_segment_smaller_than_claimed() -> None:
    source = FakeSource({0: bytearray(4096)})
    segment = shm.Segment.create(100)
    try:
        with serve(source) as (host, port):
            reply = _raw_pull(host, port, {"shm_name": segment.name, "shm_bytes": 4096})
        assert reply["ok"] is False and "has 100 bytes" in str(reply["error"])
        assert source.requests == []
    finally:
        segment.unlink()
        segment.close()


def test_blocks_that_do_not_fit_the_segment_are_refused_after_the_grant() -> None:
    source = FakeSource({0: bytearray(4096)})
    segment = shm.Segment.create(100)
    try:
        with serve(source) as (host, port):
            reply = _raw_pull(host, port, {"shm_name": segment.name, "shm_bytes": 100})
            assert source.done_event.wait(5)
        assert reply["ok"] is False and "the blocks 4096" in str(reply["error"])
        assert source.done == [("t-raw", False)]
    finally:
        segment.unlink()
        segment.close()


def test_segment_create_and_attach_share_memory() -> None:
    segment = shm.Segment.create(10)
    other = shm.Segment.attach(segment.name, 10)
    try:
        other.buf[:] = b"0123456789"
        assert bytes(segment.buf) == b"0123456789"
    finally:
        segment.unlink()
        other.close()
        segment.close()

