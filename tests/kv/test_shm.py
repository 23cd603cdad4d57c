"""The shm transport over a real KV server and real /dev/shm segments: bytes land exactly,
one segment per pair serves pull after pull, refusals carry the server's reason, and no
segment is left behind after close or on any failure path."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from shuffleinfer.kv import shm_segments
from shuffleinfer.kv.channel import KVServer, connect, recv_frame, send_frame
from shuffleinfer.kv.shm import Filler, ShmTransport
from shuffleinfer.kv.shm_segments import AttachedSegments, Segment, discard
from shuffleinfer.kv.transport import KVTransferError, Peer, PullRequest
from tests.kv.conftest import FakeSource, serve
from tests.kv.conftest import shm_segments as our_segments

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test here ends with /dev/shm as it found it."""
    before = our_segments()
    yield
    assert our_segments() - before == set(), "leaked shared-memory segments"


@pytest.fixture
def client() -> Iterator[ShmTransport]:
    """The decode side's transport, closed (its segments unlinked) after the test."""
    transport = ShmTransport()
    yield transport
    transport.close()


def _blocks(seed: int, sizes: list[int]) -> dict[int, bytearray]:
    rng = random.Random(seed)
    return {i: bytearray(rng.randbytes(size)) for i, size in enumerate(sizes)}


def _own_segments() -> set[str]:
    """Segments this process owns right now."""
    return {n for n in our_segments()
            if n.startswith(f"{shm_segments.SEGMENT_PREFIX}{os.getpid()}-")}


def _mappings_of(name: str) -> int:
    """How many mappings of segment `name` this process holds."""
    with open("/proc/self/maps") as f:
        return sum(name in line for line in f)


def test_pull_through_shared_memory_fills_odd_sized_views_exactly(
        client: ShmTransport) -> None:
    rng = random.Random(0)
    sizes = [rng.choice([0, 1, 7, 1021, 4099, 65_537, 300_001]) for _ in range(600)]
    source = FakeSource(_blocks(1, sizes))
    wanted = tuple(rng.sample(range(len(sizes)), 500))
    dest = {b: bytearray(sizes[b]) for b in wanted}
    with serve(source) as (host, port):
        nbytes = client.pull_views(Peer(host, port), PullRequest("t1", wanted, {"k": 1}),
                                   [memoryview(dest[b]) for b in wanted], timeout_s=10)
    assert nbytes == sum(sizes[b] for b in wanted)
    assert all(dest[b] == source.blocks[b] for b in wanted)
    assert source.done_event.wait(5)  # the server ends the lease after its reply
    assert source.requests == [PullRequest("t1", wanted, {"k": 1})]
    assert source.done == [("t1", True)]


def test_one_segment_serves_pull_after_pull_grows_and_is_unlinked_at_close() -> None:
    before = our_segments()
    client = ShmTransport()
    source = FakeSource(_blocks(2, [1 << 20, 3 << 20, 100]))
    with serve(source) as (host, port):
        names = []
        for i, block_ids in enumerate([(0,), (2, 0), (1, 0, 2), (0,)]):
            dest = {b: bytearray(len(source.blocks[b])) for b in block_ids}
            client.pull_views(Peer(host, port), PullRequest(f"t{i}", block_ids, {}),
                              [memoryview(dest[b]) for b in block_ids], timeout_s=10)
            assert all(dest[b] == source.blocks[b] for b in block_ids)
            (name,) = our_segments() - before
            names.append((name, os.stat(os.path.join(shm_segments.SHM_DIR, name)).st_size))
        # The server keeps its mapping between pulls, next to the client's own.
        assert _mappings_of(names[0][0]) == 2
        client.close()
        assert our_segments() - before == set()
        # Its name gone, the server lets go of its mapping at its next shm request.
        with connect(Peer(host, port), 5) as sock:
            send_frame(sock, {"op": "pull", "transport": "shm", "transfer_id": "t-x",
                              "block_ids": [0], "layout": {}, "shm_bytes": 1,
                              "shm_name": f"{shm_segments.SEGMENT_PREFIX}1-{'0' * 32}"})
            assert "cannot open shm segment" in recv_frame(sock)["error"]
        assert _mappings_of(names[0][0]) == 0
    assert len({name for name, _ in names}) == 1  # the same segment every time...
    sizes = [size for _, size in names]
    assert sizes[0] < sizes[2] == sizes[3]  # ...grown for the 4 MiB pull, never shrunk


def test_concurrent_pulls_to_one_server_each_get_their_own_segment(
        client: ShmTransport) -> None:
    barrier = threading.Barrier(3)

    class SlowSource(FakeSource):  # both pulls are in the server at the same time
        def views_for_pull(self, request: PullRequest) -> list[memoryview]:
            barrier.wait(5)
            return super().views_for_pull(request)

    source = SlowSource(_blocks(3, [1 << 20] * 3))
    results: dict[int, bytearray] = {}

    def pull(block: int) -> None:
        dest = bytearray(1 << 20)
        client.pull_views(peer, PullRequest(f"t{block}", (block,), {}), [memoryview(dest)],
                          timeout_s=10)
        results[block] = dest

    with serve(source) as (host, port):
        peer = Peer(host, port)
        threads = [threading.Thread(target=pull, args=(b,)) for b in (0, 1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert all(results[b] == source.blocks[b] for b in (0, 1, 2))
    assert len(_own_segments()) == 1  # three were in use; one is kept for the next pull


def test_refused_pull_raises_with_the_reason_and_gives_its_segment_up(
        client: ShmTransport) -> None:
    before = our_segments()
    source = FakeSource({0: bytearray(b"x" * 10)})
    with serve(source) as (host, port):
        client.pull_views(Peer(host, port), PullRequest("t-ok", (0,), {}),
                          [memoryview(bytearray(10))], timeout_s=5)
        assert len(our_segments() - before) == 1
        source.refuse = "no lease for transfer t"
        dest = bytearray(10)
        with pytest.raises(KVTransferError, match="no lease for transfer t"):
            client.pull_views(Peer(host, port), PullRequest("t", (0,), {}),
                              [memoryview(dest)], timeout_s=5)
    assert dest == bytearray(10)
    assert source.done == [("t-ok", True)]  # refused before the grant: nothing to end
    assert our_segments() - before == set()  # unlinked at once, not at close


def test_unreachable_server_leaves_no_segment(client: ShmTransport) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    host, port = listener.getsockname()[:2]
    listener.close()
    with pytest.raises(KVTransferError, match="t-gone"):
        client.pull_views(Peer(host, port), PullRequest("t-gone", (0,), {}),
                          [memoryview(bytearray(4))], timeout_s=1)
    assert not _own_segments()


def test_server_that_never_replies_times_out_and_leaves_no_segment(
        client: ShmTransport) -> None:
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
            client.pull_views(Peer(*listener.getsockname()[:2]),
                              PullRequest("t-stall", (0,), {}),
                              [memoryview(bytearray(1 << 20))], timeout_s=0.5)
        assert not _own_segments()  # given up at once: the server might still write
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert time.monotonic() - started < 5


def test_slow_source_times_the_client_out_and_still_leaks_nothing(
        client: ShmTransport) -> None:
    # The server has mapped the segment when the client gives up; it copies afterwards.
    class SlowSource(FakeSource):
        def views_for_pull(self, request: PullRequest) -> list[memoryview]:
            time.sleep(1.0)
            return super().views_for_pull(request)

    source = SlowSource({0: bytearray(b"z" * 4096)})
    with serve(source) as (host, port):
        with pytest.raises(KVTransferError, match="t-slow"):
            client.pull_views(Peer(host, port), PullRequest("t-slow", (0,), {}),
                              [memoryview(bytearray(4096))], timeout_s=0.3)
        assert not _own_segments()
        assert source.done_event.wait(5)
    # The copy went into a segment nobody reads any more: the lease is over either way.
    assert [tid for tid, _ in source.done] == ["t-slow"]


def test_pull_after_close_is_refused_without_a_segment() -> None:
    transport = ShmTransport()
    transport.close()
    with pytest.raises(KVTransferError, match="closed"):
        transport.pull_views(Peer("127.0.0.1", 1), PullRequest("t", (0,), {}),
                             [memoryview(bytearray(4))], timeout_s=1)
    assert not _own_segments()


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
    segment = Segment.create(100)
    try:
        with serve(source) as (host, port):
            reply = _raw_pull(host, port, {"shm_name": segment.name, "shm_bytes": 4096})
        assert reply["ok"] is False and "has 100 bytes" in str(reply["error"])
        assert source.requests == []
    finally:
        discard(segment)


def test_blocks_that_do_not_fit_the_segment_are_refused_after_the_grant() -> None:
    source = FakeSource({0: bytearray(4096)})
    segment = Segment.create(100)
    try:
        with serve(source) as (host, port):
            reply = _raw_pull(host, port, {"shm_name": segment.name, "shm_bytes": 100})
            assert source.done_event.wait(5)
        assert reply["ok"] is False and "the blocks 4096" in str(reply["error"])
        assert source.done == [("t-raw", False)]
    finally:
        discard(segment)


def test_server_lends_a_segment_to_one_pull_at_a_time() -> None:
    segment = Segment.create(10)
    attached = AttachedSegments()
    try:
        mine = attached.acquire(segment.name, 10)
        with pytest.raises(KVTransferError, match="in use by another pull"):
            attached.acquire(segment.name, 10)
        mine.buf[:10] = b"0123456789"
        assert bytes(segment.buf[:10]) == b"0123456789"
        attached.release(mine)
        attached.release(attached.acquire(segment.name, 10))  # free again
    finally:
        attached.close()
        discard(segment)


def test_segments_of_a_dead_worker_are_swept_and_live_ones_kept() -> None:
    code = ("import os; from shuffleinfer.kv.shm_segments import Segment; "
            "print(Segment.create(4096).name, flush=True); os._exit(0)")
    orphan = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()[-1]
    live = Segment.create(4096)
    try:
        assert {orphan, live.name} <= our_segments()
        assert orphan in shm_segments.sweep_orphans()
        assert orphan not in our_segments() and live.name in our_segments()
    finally:
        discard(live)


def test_filler_copies_any_split_of_the_segment_into_odd_views_exactly() -> None:
    rng = random.Random(3)
    sizes = [rng.choice([0, 1, 5, 333, 4096]) for _ in range(40)]
    data = bytes(rng.randbytes(sum(sizes)))
    for _ in range(20):
        dest = [bytearray(n) for n in sizes]
        filler = Filler(memoryview(data), [memoryview(d) for d in dest])
        cuts = sorted(rng.sample(range(len(data)), 6))
        for cut in cuts:
            assert filler.fill_to(cut) == cut
        assert filler.fill_to(len(data) + 10) == len(data)  # no further than the views
        assert b"".join(dest) == data


def test_the_client_copies_each_filled_part_while_the_server_fills_the_next(
        client: ShmTransport) -> None:
    # A raw server: fills the first half, says so, and finishes only once the client has
    # copied that half out (so the copies overlap), then fails the pull on purpose.
    listener = socket.create_server(("127.0.0.1", 0))
    half = 1 << 20
    dest = bytearray(2 * half)
    seen_first_half = threading.Event()

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            header = recv_frame(conn)
            assert header["progress_bytes"] > 0
            attached = AttachedSegments()
            segment = attached.acquire(header["shm_name"], header["shm_bytes"])
            segment.buf[:half] = b"a" * half
            send_frame(conn, {"ok": True, "filled": half})
            deadline = time.monotonic() + 5
            while dest[:half] != b"a" * half and time.monotonic() < deadline:
                time.sleep(0.01)
            if dest[:half] == b"a" * half:
                seen_first_half.set()
            attached.release(segment)
            attached.close()
            send_frame(conn, {"ok": False, "error": "lease gone mid-copy"})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        with pytest.raises(KVTransferError, match="lease gone mid-copy"):
            client.pull_views(Peer(*listener.getsockname()[:2]),
                              PullRequest("t-stream", (0,), {}), [memoryview(dest)],
                              timeout_s=10)
        thread.join(10)
        assert seen_first_half.is_set()
        assert not _own_segments()  # a failed pull gives its segment up
    finally:
        listener.close()


def _idle_families(transport: ShmTransport, peer: Peer) -> list[int]:
    """Address families of the connections `transport` keeps idle to `peer`."""
    return [sock.family for _, sock in transport._connections._idle.get(peer, [])]


def test_later_pulls_dial_the_servers_local_listener_and_tcp_when_it_is_gone(
        client: ShmTransport) -> None:
    """The first pull's reply names the server's local listener; later pulls use it. A
    server restarted on the same port has another one: the stale name is dropped, the
    pull goes by TCP and learns the new name."""
    source = FakeSource(_blocks(3, [4096, 70_001]))

    def pull(peer: Peer, transfer_id: str) -> None:
        dest = [bytearray(4096), bytearray(70_001)]
        client.pull_views(peer, PullRequest(transfer_id, (0, 1), {}),
                          [memoryview(d) for d in dest], timeout_s=10)
        assert dest == [source.blocks[0], source.blocks[1]]

    first = KVServer("127.0.0.1", 0, source, {"shm": ShmTransport()})
    first.start()
    peer = Peer(*first.address)
    try:
        pull(peer, "t0")
        assert _idle_families(client, peer) == []  # the TCP one was let go once told
        pull(peer, "t1")
        assert _idle_families(client, peer) == [socket.AF_UNIX]
    finally:
        first.close()
    second = KVServer("127.0.0.1", peer.port, source, {"shm": ShmTransport()})
    second.start()
    try:
        pull(peer, "t2")  # the idle local connection is dead, so is the name: by TCP
        pull(peer, "t3")
        assert _idle_families(client, peer) == [socket.AF_UNIX]
        assert second.local_name != first.local_name
    finally:
        second.close()
