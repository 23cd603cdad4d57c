"""Measurements behind `python -m benchmarks kv` (and `shuffleinfer calibrate`'s link
speed): hand blocks over by tcp and by shm, and the primitives they are built on.

A prefill worker (a real `ConnectorWorker` with its KV server) runs in a child process on
CPU tensors shaped like the default model's cache (30 layers, 3 KV heads x 64 dims,
float32, vLLM's CPU block size 128; each side's cache holds twice the blocks handed
over, so that one layer's blocks do not run on into the next's); this process pulls its
leased blocks into its own cache through each transport in turn, over side-channel
connections kept open as a serving decode keeps them, and checks the bytes of every
round, in both modes: whole (the blocks are read out of the prefill's cache at pull
time; by shm, straight out of its shared cache, `shared_cache.py`) and overlap (they
were staged while the prefill ran, `staging.py`; only the pull is timed). Round 0 is not
timed: it is where shm allocates the segments it then reuses. The limits: one thread's
in-process memcpy of the same bytes from a source out of cache, as a pull's is
(`memcpy_seconds`, before and after the pulls), and a raw loopback socket stream from
another process (once per round, after the pulls: `SocketLimit`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import cast

import numpy as np
import torch

from shuffleinfer.kv.block_views import VLLM_BLOCK_DIM, KVCacheViews
from shuffleinfer.kv.shm import ShmTransport
from shuffleinfer.kv.tcp import TcpTransport
from shuffleinfer.kv.transport import Peer, PullRequest, Transport


@dataclass(frozen=True)
class CacheShape:
    """The KV cache of the default model as vLLM's CPU backend lays it out."""

    num_layers: int = 30
    kv_heads: int = 3
    head_size: int = 64
    block_size: int = 128
    dtype: torch.dtype = torch.float32

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        per_layer = self.kv_heads * self.block_size * 2 * self.head_size
        return self.num_layers * per_layer * self.dtype.itemsize


def make_caches(shape: CacheShape, num_blocks: int, seed: int) -> dict[str, torch.Tensor]:
    """Every layer a [num_blocks, kv_heads, block_size, 2*head_size] view of one buffer."""
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.randn(shape.num_layers, num_blocks, shape.kv_heads, shape.block_size,
                         2 * shape.head_size, generator=gen).to(shape.dtype)
    return {f"model.layers.{i}.self_attn.attn": buffer[i] for i in range(shape.num_layers)}


MODES = ("whole", "overlap")


def cache_blocks(num_blocks: int) -> int:
    """Blocks of each side's cache when `num_blocks` are handed over: twice as many, so
    that, as in an engine's cache, one layer's pulled blocks do not run on into the next
    layer's (which would let a copy or a send cover several layers at once)."""
    return 2 * num_blocks


def _prefill_main(conn: Connection, shape: CacheShape, num_blocks: int) -> None:
    """Child process: serve leases on request until told to stop (None); an overlap
    round's blocks are staged (and the copies done) before the lease is acknowledged."""
    from shuffleinfer.kv.metadata import Lease, ShuffleConnectorMetadata, StageBlocks
    from shuffleinfer.kv.worker_side import ConnectorWorker

    worker = ConnectorWorker("127.0.0.1", 0, lease_s=600.0, pull_timeout_s=60.0,
                             staging_bytes=2 * num_blocks * shape.block_bytes)
    worker.register_kv_caches(make_caches(shape, cache_blocks(num_blocks), seed=0),
                              num_blocks=cache_blocks(num_blocks), block_dim=VLLM_BLOCK_DIM)
    conn.send(worker.address)
    while (msg := conn.recv()) is not None:
        transfer_id, block_ids, mode = msg
        if mode == "overlap":
            worker.after_forward(ShuffleConnectorMetadata(stage=[
                StageBlocks(transfer_id, len(block_ids), 0, tuple(block_ids))]))
        worker.on_metadata(ShuffleConnectorMetadata(
            new_leases=[Lease(transfer_id, f"req-{transfer_id}", tuple(block_ids))]))
        if worker.stager is not None:
            worker.stager.fence([transfer_id])
        conn.send(True)
    worker.shutdown()


def _reply(conn: Connection, proc: mp.process.BaseProcess, timeout_s: float = 120.0
           ) -> object:
    """The child's next message; raises if it dies or says nothing for `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.1):
        if not proc.is_alive():
            raise RuntimeError(f"the prefill process died (exit code {proc.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the prefill process said nothing for {timeout_s} s")
    return conn.recv()


def run(mib: float, rounds: int, shape: CacheShape) -> dict[str, list[float]]:
    """Seconds per whole-mode hand-over of `mib` MiB, per transport (see `run_blocks`)."""
    blocks = max(1, math.ceil(mib * (1 << 20) / shape.block_bytes))
    return run_blocks(blocks, rounds, shape, modes=("whole",))["whole"]


def run_blocks(num_blocks: int, rounds: int, shape: CacheShape,
               modes: tuple[str, ...] = MODES,
               each_round: Callable[[], None] | None = None
               ) -> dict[str, dict[str, list[float]]]:
    """Seconds per hand-over of `num_blocks` blocks, per mode and transport, interleaved
    round by round; the first entry of each list is the untimed warm-up round's.
    `each_round` is called after each round's pulls (`SocketLimit.round`). This
    process pulls as a decode engine's worker does, with one torch thread: with more,
    the torch work between rounds (zeroing, checking) leaves OpenMP threads spinning on
    the other core, where the prefill process serves (a 1-block tcp pull measured
    3.2 ms instead of about 2; shm did not change)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_blocks(num_blocks, rounds, shape, modes, each_round)
    finally:
        torch.set_num_threads(threads)


def _run_blocks(num_blocks: int, rounds: int, shape: CacheShape, modes: tuple[str, ...],
                each_round: Callable[[], None] | None
                ) -> dict[str, dict[str, list[float]]]:
    transports: list[Transport] = [TcpTransport(), ShmTransport()]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_main, args=(child, shape, num_blocks), daemon=True)
    proc.start()
    try:
        host, port = cast(tuple[str, int], _reply(parent, proc))
        peer = Peer(host, port)
        # The child's cache holds the same bytes; each side's first num_blocks move.
        src = make_caches(shape, cache_blocks(num_blocks), seed=0)
        dst_caches = make_caches(shape, cache_blocks(num_blocks), seed=1)
        kv = KVCacheViews(dst_caches, num_blocks=cache_blocks(num_blocks),
                          block_dim=VLLM_BLOCK_DIM)
        block_ids = tuple(range(num_blocks))
        seconds: dict[str, dict[str, list[float]]] = {
            mode: {t.name: [] for t in transports} for mode in modes}
        for r in range(rounds + 1):  # round 0 warms up every path
            for mode in modes:
                for transport in transports:
                    tid = f"{transport.name}-{mode}-{r}"
                    parent.send((tid, block_ids, mode))
                    _reply(parent, proc)
                    for cache in dst_caches.values():
                        cache.zero_()
                    started = time.perf_counter()
                    transport.pull(peer, PullRequest(tid, block_ids, kv.layout), kv,
                                   block_ids, 60.0)
                    elapsed = time.perf_counter() - started
                    if not all(torch.equal(dst_caches[n][:num_blocks], src[n][:num_blocks])
                               for n in src):
                        raise RuntimeError(f"{transport.name} ({mode}) delivered wrong bytes "
                                           f"in round {r}")
                    seconds[mode][transport.name].append(elapsed)
            if each_round is not None:
                each_round()
        parent.send(None)
        proc.join(30)
        return seconds
    finally:
        for transport in transports:
            transport.close()
        if proc.is_alive():
            proc.kill()


EVICT_BYTES = 512 << 20
"""Bytes read before each cold-source memcpy: well over this machine's caches (its L3
holds about 40 MiB of copies, though it reports 260 MiB)."""


class SocketLimit:
    """The limit tcp is held against, timed once per round beside the transports' pulls
    (`run_blocks`' `each_round`), so that a noisy spell of the machine slows both (a
    loopback stream here ranged from 2 to 5.6 GB/s between runs minutes apart): a raw
    TCP stream of `nbytes` from another process (one `sendall`, `recv_into` one
    buffer). `seconds` holds its times (the first round's included). (memcpy is timed
    apart, `memcpy_seconds`: copies between rounds would keep their buffers in cache in
    place of the pulls' source, which slowed one-block shm pulls by a quarter.)"""

    def __init__(self, nbytes: int) -> None:
        self._received = memoryview(bytearray(nbytes))
        self.seconds: list[float] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._proc = mp.get_context("spawn").Process(
            target=_socket_sender, args=(self._server.getsockname()[1], nbytes), daemon=True)
        self._proc.start()
        self._server.settimeout(120)
        self._sock, _ = self._server.accept()
        self._sock.settimeout(120)

    def round(self) -> None:
        """Time one stream."""
        from shuffleinfer.kv.channel import recv_exact_into

        started = time.perf_counter()
        self._sock.sendall(b"g")
        recv_exact_into(self._sock, self._received)
        self.seconds.append(time.perf_counter() - started)

    def close(self) -> None:
        self._sock.close()
        self._server.close()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()


def memcpy_seconds(nbytes: int, rounds: int, all_cores: bool = False,
                   cold_source: bool = False) -> list[float]:
    """Seconds per copy of `nbytes` from one buffer to another in this process: one
    thread's memcpy (numpy's copy, as each side of the shm transport copies), the same
    two buffers round after round (in cache while they fit), the limit shm is held
    against; for reference, with `all_cores`, torch's copy split across every core (an
    engine's worker has one core), or with `cold_source`, one thread's copy after
    flushing the caches (reading `EVICT_BYTES`) and then writing the destination, as a
    pull's source is memory this core has not touched since the prefill wrote it while
    its destination blocks were just zeroed."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
    evict = np.ones(EVICT_BYTES if cold_source else 0, dtype=np.uint8)
    times = []
    for _ in range(rounds + 1):
        if cold_source:
            evict.sum(dtype=np.uint64)
            dst.fill(0)
        started = time.perf_counter()
        if all_cores:
            dst_t.copy_(src_t)
        else:
            np.copyto(dst, src)
        times.append(time.perf_counter() - started)
    return times


def _socket_sender(port: int, nbytes: int) -> None:
    """Child process: connect to loopback `port` and send `nbytes` each time the receiver
    asks, until it closes the connection."""
    data = memoryview(bytearray(b"\x01") * nbytes)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        while sock.recv(1):  # the receiver is ready for the next round (b"": done)
            sock.sendall(data)
