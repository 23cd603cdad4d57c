"""Benchmark of the CPU KV transports: hand N MiB of blocks over by tcp and by shm.

    python -m shuffleinfer.kv.bench [--mib 256] [--rounds 5] [--block-size 128]

A prefill worker (a real `ConnectorWorker` with its KV server) runs in a child process on
CPU tensors shaped like the default model's cache (30 layers, 3 KV heads x 64 dims,
float32, vLLM's CPU block size 128); this process pulls its leased blocks into its own
cache through each transport in turn, checks the bytes, and prints GB/s (10^9 bytes per
second) for each and their ratio. Every round's bytes are checked. Round 0 is not timed:
it is where shm allocates the segment it then reuses (its time is shown as "first ms").
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import cast

import torch

from shuffleinfer.kv.block_views import VLLM_BLOCK_DIM, KVCacheViews
from shuffleinfer.kv.shm import ShmTransport
from shuffleinfer.kv.shm_segments import Segment, discard
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


def _prefill_main(conn: Connection, shape: CacheShape, num_blocks: int) -> None:
    """Child process: serve leases on request until told to stop (None)."""
    from shuffleinfer.kv.metadata import Lease, ShuffleConnectorMetadata
    from shuffleinfer.kv.worker_side import ConnectorWorker

    worker = ConnectorWorker("127.0.0.1", 0, lease_s=600.0, pull_timeout_s=60.0)
    worker.register_kv_caches(make_caches(shape, num_blocks, seed=0), num_blocks=num_blocks,
                              block_dim=VLLM_BLOCK_DIM)
    conn.send(worker.address)
    while (msg := conn.recv()) is not None:
        transfer_id, block_ids = msg
        worker.on_metadata(ShuffleConnectorMetadata(
            new_leases=[Lease(transfer_id, f"req-{transfer_id}", tuple(block_ids))]))
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
    """Seconds per hand-over of `mib` MiB, per transport, interleaved round by round;
    the first entry of each list is the untimed warm-up round's."""
    num_blocks = max(1, math.ceil(mib * (1 << 20) / shape.block_bytes))
    transports: list[Transport] = [TcpTransport(), ShmTransport()]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_main, args=(child, shape, num_blocks), daemon=True)
    proc.start()
    try:
        host, port = cast(tuple[str, int], _reply(parent, proc))
        peer = Peer(host, port)
        src = make_caches(shape, num_blocks, seed=0)  # the same bytes as the child's
        dst_caches = make_caches(shape, num_blocks, seed=1)
        kv = KVCacheViews(dst_caches, num_blocks=num_blocks, block_dim=VLLM_BLOCK_DIM)
        block_ids = tuple(range(num_blocks))
        seconds: dict[str, list[float]] = {t.name: [] for t in transports}
        for r in range(rounds + 1):  # round 0 warms up both paths
            for transport in transports:
                tid = f"{transport.name}-{r}"
                parent.send((tid, block_ids))
                _reply(parent, proc)
                for cache in dst_caches.values():
                    cache.zero_()
                started = time.perf_counter()
                transport.pull(peer, PullRequest(tid, block_ids, kv.layout), kv, block_ids, 60.0)
                elapsed = time.perf_counter() - started
                if not all(torch.equal(dst_caches[n], src[n]) for n in src):
                    raise RuntimeError(f"{transport.name} delivered wrong bytes in round {r}")
                seconds[transport.name].append(elapsed)
        parent.send(None)
        proc.join(30)
        return seconds
    finally:
        for transport in transports:
            transport.close()
        if proc.is_alive():
            proc.kill()


def segment_seconds(nbytes: int, rounds: int) -> float:
    """Median seconds to create (allocate and zero), unlink and free a segment of
    `nbytes`: what each shm pull cost before segments were reused."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        segment = Segment.create(nbytes)
        discard(segment)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """Command line entry: run and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=256.0, help="MiB handed over per pull")
    parser.add_argument("--rounds", type=int, default=5, help="timed pulls per transport")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block")
    args = parser.parse_args(argv)
    shape = CacheShape(block_size=args.block_size)
    num_blocks = max(1, math.ceil(args.mib * (1 << 20) / shape.block_bytes))
    nbytes = num_blocks * shape.block_bytes
    seconds = run(args.mib, args.rounds, shape)
    print(f"KV hand-over of {nbytes / (1 << 20):.1f} MiB: {num_blocks} blocks x "
          f"{shape.num_layers} layers, block [{shape.kv_heads}, {shape.block_size}, "
          f"{2 * shape.head_size}] {str(shape.dtype).removeprefix('torch.')}, "
          f"{args.rounds} timed rounds each")
    print(f"{'transport':<10} {'median GB/s':>12} {'best GB/s':>10} {'median ms':>10} "
          f"{'first ms':>9}")
    medians = {}
    for name, (first, *times) in seconds.items():
        medians[name] = statistics.median(times)
        print(f"{name:<10} {nbytes / medians[name] / 1e9:>12.2f} "
              f"{nbytes / min(times) / 1e9:>10.2f} {medians[name] * 1e3:>10.1f} "
              f"{first * 1e3:>9.1f}")
    print(f"shm / tcp (median throughput): {medians['tcp'] / medians['shm']:.2f}x")
    print(f"a new segment's allocation and release (once per pair, then reused): "
          f"{segment_seconds(nbytes, args.rounds) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
