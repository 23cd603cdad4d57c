"""The KV pull wire over real loopback sockets: bytes land exactly, refusals carry the
server's reason, a dying server fails the pull instead of hanging it."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from shuffleinfer.kv import channel, tcp
from shuffleinfer.kv.transport import KVTransferError, PullRequest
from tests.kv.conftest import FakeSource
from tests.kv.conftest import serve as _serve

pytestmark = pytest.mark.timeout(30)


def _random_blocks(rng: random.Random, sizes: list[int]) -> dict[int, bytearray]:
    return {i: bytearray(rng.randbytes(size)) for i, size in enumerate(sizes)}


def test_pull_fills_many_odd_sized_views_exactly() -> None:
    rng = random.Random(0)
    # More views than one scatter/gather batch (512), sizes that are multiples of nothing,
    # a few empty ones and a few large enough to need several socket sends.
    sizes = [rng.choice([0, 1, 7, 1021, 4099, 65_537, 300_001]) for _ in range(1300)]
    source = FakeSource(_random_blocks(rng, sizes))
    wanted = tuple(rng.sample(range(len(sizes)), 1100))
    dest = {b: bytearray(sizes[b]) for b in wanted}
    received: list[int] = []

    with _serve(source) as (host, port):
        nbytes = tcp.pull(host, port, PullRequest("t1", wanted, {"k": 1}),
                          [memoryview(dest[b]) for b in wanted], timeout_s=10,
                          on_bytes=received.append)

    expected_bytes = sum(sizes[b] for b in wanted)
    assert nbytes == expected_bytes == sum(received)
    assert all(dest[b] == source.blocks[b] for b in wanted)
    assert source.requests == [PullRequest("t1", wanted, {"k": 1})]
    assert source.done_event.wait(5)
    assert source.done == [("t1", True)]


def test_views_into_one_buffer_do_not_spill_into_neighbours() -> None:
    # Destination views are slices of one big buffer, as KV blocks are in a cache tensor.
    rng = random.Random(1)
    sizes = [rng.randrange(1, 3000) for _ in range(700)]
    source = FakeSource(_random_blocks(rng, sizes))
    block_ids = tuple(range(len(sizes)))
    gap = 5
    buffer = bytearray(b"\xaa" * (sum(sizes) + gap * len(sizes)))
    views, offsets = [], []
    offset = 0
    for size in sizes:
        offsets.append(offset)
        views.append(memoryview(buffer)[offset:offset + size])
        offset += size + gap

    with _serve(source) as (host, port):
        tcp.pull(host, port, PullRequest("t", block_ids, {}), views, timeout_s=10)

    for b, (size, start) in enumerate(zip(sizes, offsets, strict=True)):
        assert buffer[start:start + size] == source.blocks[b]
        assert buffer[start + size:start + size + gap] == b"\xaa" * gap


def test_refused_pull_raises_with_the_servers_reason() -> None:
    source = FakeSource({0: bytearray(b"x" * 10)}, refuse="KV layout mismatch: dtype")
    dest = bytearray(10)
    with _serve(source) as (host, port):
        with pytest.raises(KVTransferError, match="KV layout mismatch: dtype"):
            tcp.pull(host, port, PullRequest("t", (0,), {}), [memoryview(dest)],
                     timeout_s=5)
    assert dest == bytearray(10)
    assert source.done == []  # nothing was leased out, so nothing to end


@contextmanager
def _fake_server(behaviour: str) -> Iterator[tuple[str, int]]:
    """A one-shot raw server: accepts a pull, says ok, then misbehaves."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            channel.recv_frame(conn)
            if behaviour == "garbage_reply":
                conn.sendall(channel._LEN.pack(5) + b"nope!")
                return
            channel.send_frame(conn, {"ok": True, "error": None})
            if behaviour == "close_mid_transfer":
                conn.sendall(b"y" * 1500)
            elif behaviour == "stall":
                stop.wait(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        thread.join(10)
        listener.close()


@pytest.mark.parametrize("behaviour", ["close_mid_transfer", "stall", "garbage_reply"])
def test_server_failing_mid_transfer_fails_the_pull_quickly(behaviour: str) -> None:
    dest = [memoryview(bytearray(1000)) for _ in range(4)]
    with _fake_server(behaviour) as (host, port):
        with pytest.raises(KVTransferError, match="t-mid"):
            tcp.pull(host, port, PullRequest("t-mid", (0, 1, 2, 3), {}), dest,
                     timeout_s=0.5)


def test_client_that_stops_reading_does_not_hold_the_lease_forever() -> None:
    # 64 MiB is far more than loopback socket buffers hold, so the server's send blocks.
    source = FakeSource({0: bytearray(64 << 20)})
    with _serve(source, io_timeout_s=0.5) as (host, port):
        with socket.create_connection((host, port), timeout=5) as stalled:
            channel.send_frame(stalled, {"op": "pull", "transfer_id": "t-stall",
                                     "block_ids": [0], "layout": {}})
            assert channel.recv_frame(stalled) == {"ok": True, "error": None}
            assert source.done_event.wait(10), "server never gave up on a stalled reader"
    assert source.done == [("t-stall", False)]


def test_release_calls_on_release() -> None:
    source = FakeSource({})
    with _serve(source) as (host, port):
        channel.release(host, port, "lease-7", timeout_s=5)
    assert source.released == ["lease-7"]
    assert source.requests == []


def test_pull_from_a_closed_port_raises_transfer_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    host, port = listener.getsockname()[:2]
    listener.close()
    with pytest.raises(KVTransferError, match="t-gone"):
        tcp.pull(host, port, PullRequest("t-gone", (0,), {}),
                 [memoryview(bytearray(4))], timeout_s=1)
    with pytest.raises(KVTransferError, match="t-gone"):
        channel.release(host, port, "t-gone", timeout_s=1)
