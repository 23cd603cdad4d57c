"""Helpers shared by the KV tests: a fake lease source behind a real KV server, and
workers on real CPU tensors shaped like vLLM's KV caches, driven like engine steps."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from shuffleinfer.kv.channel import KVServer
from shuffleinfer.kv.metadata import Lease, PlannedLoad, ShuffleConnectorMetadata
from shuffleinfer.kv.shm import ShmTransport
from shuffleinfer.kv.shm_segments import SEGMENT_PREFIX, SHM_DIR
from shuffleinfer.kv.tcp import TcpTransport
from shuffleinfer.kv.transport import KVSource, KVTransferError, PullRequest
from shuffleinfer.kv.worker_side import ConnectorWorker

NUM_BLOCKS = 8
NUM_LAYERS = 11  # more than 10, so name order ("layers.10" < "layers.2") is not numeric


# --- a fake source behind a real server ----------------------------------------------------

class FakeSource(KVSource):
    """Serves numbered bytearrays as blocks; records what the server told it."""

    def __init__(self, blocks: dict[int, bytearray], refuse: str | None = None) -> None:
        self.blocks = blocks
        self.refuse = refuse
        self.requests: list[PullRequest] = []
        self.done: list[tuple[str, bool]] = []
        self.released: list[str] = []
        self.unauthorized: list[str] = []
        self.done_event = threading.Event()

    def views_for_pull(self, request: PullRequest) -> list[memoryview]:
        self.requests.append(request)
        if self.refuse is not None:
            raise KVTransferError(self.refuse)
        return [memoryview(self.blocks[b]) for b in request.block_ids]

    def on_pull_done(self, transfer_id: str, ok: bool) -> None:
        self.done.append((transfer_id, ok))
        self.done_event.set()

    def on_release(self, transfer_id: str) -> None:
        self.released.append(transfer_id)

    def on_unauthorized(self, client: str) -> None:
        self.unauthorized.append(client)


@contextmanager
def serve(source: KVSource, io_timeout_s: float = 10.0, auth_token: str | None = None
          ) -> Iterator[tuple[str, int]]:
    """A KV server for `source` on a free loopback port, serving tcp and shm."""
    transports = {"tcp": TcpTransport(auth_token), "shm": ShmTransport(auth_token)}
    server = KVServer("127.0.0.1", 0, source, transports, io_timeout_s=io_timeout_s,
                      auth_token=auth_token)
    server.start()
    try:
        yield server.address
    finally:
        server.close()
        for transport in transports.values():
            transport.close()


def shm_segments() -> set[str]:
    """Our segments currently in /dev/shm (to check none leaks)."""
    return {n for n in os.listdir(SHM_DIR) if n.startswith(SEGMENT_PREFIX)}


# --- workers on CPU tensors ----------------------------------------------------------------

def kv_caches(seed: int, num_layers: int = NUM_LAYERS, dtype: torch.dtype = torch.bfloat16,
              kv_heads: int = 3, block_size: int = 128, head_size: int = 64
              ) -> dict[str, torch.Tensor]:
    """Like vLLM's CPU cache (layout LBHNC): every layer a contiguous
    [num_blocks, kv_heads, block_size, 2*head_size] view of one buffer."""
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.randn(num_layers, NUM_BLOCKS, kv_heads, block_size, 2 * head_size,
                         generator=gen).to(dtype)
    return {f"model.layers.{i}.self_attn.attn": buffer[i] for i in range(num_layers)}


def vllm_kv_caches(seed: int, layout: str, num_layers: int = 3, kv_heads: int = 2,
                   block_size: int = 16, head_size: int = 64,
                   dtype: torch.dtype = torch.bfloat16, kernel_block_size: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """Exactly what vLLM 0.32 registers for a model of full-attention layers under the
    KV cache layout named `layout` (LBHNC: the CPU backend; LBNHC: FlashAttention's
    default), `kernel_block_size` if the kernel splits blocks: its own
    `create_kv_cache_views` over one random buffer."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=kv_heads,
                             head_size=head_size, dtype=dtype)
    kv_layout = KVCacheLayout[layout]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, num_layers,
                                                            kv_layout)
    size = num_layers * NUM_BLOCKS * spec.page_size_bytes
    tensor = KVCacheTensor(size=size, layers=[f"model.layers.{i}.self_attn.attn"
                                              for i in range(num_layers)],
                           layer_stride=layer_stride, block_stride=block_stride)
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-128, 128, (size,), dtype=torch.int8, generator=gen)
    views = create_kv_cache_views(raw, spec, NUM_BLOCKS, kv_layout, tensor,
                                  kernel_block_size=kernel_block_size)
    return dict(zip(tensor.layers, views, strict=True))


def legacy_flash_kv_caches(seed: int, num_layers: int = 3) -> dict[str, torch.Tensor]:
    """FlashAttention's layout before vLLM 0.32: every layer
    (2, num_blocks, block_size, kv_heads, head_size), K and V in the leading dim."""
    gen = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn":
            torch.randn(2, NUM_BLOCKS, 16, 2, 64, generator=gen).to(torch.bfloat16)
            for i in range(num_layers)}


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def meta(leases: list[Lease] | None = None, loads: list[PlannedLoad] | None = None
         ) -> ShuffleConnectorMetadata:
    return ShuffleConnectorMetadata(new_leases=leases or [], new_loads=loads or [])


WorkerFactory = Callable[..., ConnectorWorker]


@pytest.fixture
def make_worker() -> Iterator[WorkerFactory]:
    """Builds workers on free ports with registered caches (`NUM_BLOCKS` blocks unless
    told otherwise); shuts them all down after. Extra keyword arguments (transport,
    auth_token, host_id, ...) go to ConnectorWorker."""
    made: list[ConnectorWorker] = []

    def make(caches: dict[str, torch.Tensor], lease_s: float = 30.0,
             lease_wait_s: float = 5.0, stage_through_host: bool | None = None,
             num_blocks: int | None = NUM_BLOCKS, block_dim: int | None = None,
             **kwargs: Any) -> ConnectorWorker:
        worker = ConnectorWorker("127.0.0.1", 0, lease_s=lease_s,
                                 pull_timeout_s=kwargs.pop("pull_timeout_s", 5.0),
                                 lease_wait_s=lease_wait_s,
                                 stage_through_host=stage_through_host, **kwargs)
        made.append(worker)
        worker.register_kv_caches(caches, num_blocks=num_blocks, block_dim=block_dim)
        return worker

    yield make
    for worker in made:
        worker.shutdown()


class Steps:
    """Drives a worker's get_finished like engine steps and keeps what it reported.

    vLLM passes each finished req id in exactly one step, so `finish` does too."""

    def __init__(self, worker: ConnectorWorker) -> None:
        self.worker = worker
        self.sending: list[str] = []
        self.recving: list[str] = []

    def step(self, finished_req_ids: set[str] | None = None) -> None:
        sending, recving = self.worker.get_finished(set(finished_req_ids or ()))
        self.sending += sorted(sending)
        self.recving += sorted(recving)

    def until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, "the worker never reported it"
            time.sleep(0.005)
            self.step()

    def idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.005)
            self.step()


def pull(decode: ConnectorWorker, load: PlannedLoad) -> Steps:
    """Plan `load` on `decode` and step it until it reports the pull done (or failed)."""
    decode.on_metadata(meta(loads=[load]))
    steps = Steps(decode)
    steps.until(lambda: load.engine_req_id in steps.recving)
    return steps


def hand_over(prefill: ConnectorWorker, decode: ConnectorWorker, lease: Lease,
              load: PlannedLoad) -> Steps:
    """Lease on `prefill`, then `pull` on `decode`."""
    prefill.on_metadata(meta(leases=[lease]))
    return pull(decode, load)


def lease_and_load(prefill: ConnectorWorker, transfer_id: str, remote: tuple[int, ...],
                   local: tuple[int, ...]) -> tuple[Lease, PlannedLoad]:
    """A lease on `prefill` and the load a decode plans for it, with the host identity the
    prefill would advertise."""
    host, port = prefill.address
    return (Lease(transfer_id, f"pre-{transfer_id}", remote),
            PlannedLoad(transfer_id, f"dec-{transfer_id}", host, port, remote, local,
                        remote_host_id=prefill.host_id, remote_kv_device="cpu"))
