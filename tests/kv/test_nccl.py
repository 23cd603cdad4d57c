"""The nccl transport. On CPU: it imports, refuses what it cannot do with a clear error
(the pull's failure path), never hangs. With two CUDA GPUs (`gpu` marker): a real pull
between two workers, the pair reused, and a dead peer failing the pull within its timeout."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.channel import connect, recv_frame, send_frame
from shuffleinfer.kv.nccl import NcclTransport
from shuffleinfer.kv.transport import KVTransferError, Peer, PullRequest
from tests.kv.conftest import (
    FakeSource,
    Steps,
    WorkerFactory,
    as_bytes,
    kv_caches,
    lease_and_load,
    meta,
    serve,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cpu_nccl_server() -> Iterator[tuple[FakeSource, str, int]]:
    from shuffleinfer.kv.channel import KVServer

    source = FakeSource({0: bytearray(8)})
    transport = NcclTransport(torch.device("cpu"), "127.0.0.1")
    server = KVServer("127.0.0.1", 0, source, {"nccl": transport})
    server.start()
    try:
        yield source, *server.address
    finally:
        server.close()
        transport.close()


def test_pull_into_a_cpu_cache_is_refused_before_dialling() -> None:
    kv = KVCacheViews(kv_caches(0))
    transport = NcclTransport(torch.device("cpu"), "127.0.0.1")
    with pytest.raises(KVTransferError, match="needs a KV cache on a CUDA device"):
        transport.pull(Peer("127.0.0.1", 1), PullRequest("t", (1,), kv.layout), kv, (2,), 1)


def test_connect_to_a_server_without_nccl_is_refused(
        cpu_nccl_server: tuple[FakeSource, str, int]) -> None:
    _, host, port = cpu_nccl_server
    with connect(Peer(host, port), 5) as sock:
        send_frame(sock, {"op": "connect", "transport": "nccl"})
        reply = recv_frame(sock)
    assert reply["ok"] is False and "NCCL is not available" in reply["error"]


def test_pull_on_an_unknown_pair_is_refused_without_touching_the_lease(
        cpu_nccl_server: tuple[FakeSource, str, int]) -> None:
    source, host, port = cpu_nccl_server
    with connect(Peer(host, port), 5) as sock:
        send_frame(sock, {"op": "pull", "transport": "nccl", "nccl_pair": "nope",
                          "transfer_id": "t", "block_ids": [0], "layout": {}})
        reply = recv_frame(sock)
    assert reply["ok"] is False and "unknown nccl pair" in reply["error"]
    assert source.requests == []


def test_a_cpu_only_server_does_not_offer_nccl() -> None:
    with serve(FakeSource({})) as (host, port):
        with connect(Peer(host, port), 5) as sock:
            send_frame(sock, {"op": "connect", "transport": "nccl"})
            assert "not served here" in recv_frame(sock)["error"]


# --- real GPUs --------------------------------------------------------------------------

def _two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (NCCL refuses two ranks on one GPU)")


def _on(device: str, seed: int) -> dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in kv_caches(seed).items()}


@pytest.mark.gpu
def test_gpu_pair_pulls_by_nccl_and_reuses_the_pair(make_worker: WorkerFactory) -> None:
    _two_gpus()
    src, dst = _on("cuda:0", 0), _on("cuda:1", 1)
    prefill, decode = make_worker(src), make_worker(dst)  # auto: both on GPU -> nccl
    d_steps = Steps(decode)
    for i, (remote, local) in enumerate([((1, 5, 2), (7, 3, 4)), ((6,), (1,))]):
        lease, load = lease_and_load(prefill, f"t-gpu-{i}", remote=remote, local=local)
        load = dataclasses.replace(load, remote_kv_device="cuda")
        prefill.on_metadata(meta(leases=[lease]))
        decode.on_metadata(meta(loads=[load]))
        req_id = load.engine_req_id
        d_steps.until(lambda req_id=req_id: req_id in d_steps.recving, timeout_s=90)
        assert decode.get_block_ids_with_load_errors() == set()
        for name in src:
            for r, lb in zip(remote, local, strict=True):
                assert as_bytes(dst[name][lb].cpu()) == as_bytes(src[name][r].cpu())
    stats = decode.get_stats()
    assert stats is not None
    assert stats.data["num_transfers_nccl"] == 2 and stats.data["num_failures"] == 0
    nccl = decode._transports["nccl"]
    assert len(nccl._client_pairs) == 1  # type: ignore[attr-defined]


@pytest.mark.gpu
def test_gpu_pull_from_a_prefill_that_never_sends_fails_within_the_timeout(
        make_worker: WorkerFactory) -> None:
    _two_gpus()
    src, dst = _on("cuda:0", 0), _on("cuda:1", 1)
    prefill = make_worker(src)
    decode = make_worker(dst, pull_timeout_s=3.0)
    # Set the pair up with one good pull.
    lease, load = lease_and_load(prefill, "t-warm", remote=(1,), local=(2,))
    load = dataclasses.replace(load, remote_kv_device="cuda")
    prefill.on_metadata(meta(leases=[lease]))
    decode.on_metadata(meta(loads=[load]))
    d_steps = Steps(decode)
    d_steps.until(lambda: load.engine_req_id in d_steps.recving, timeout_s=90)

    # The prefill says ok, then never sends: the decode's NCCL recv would wait forever.
    def ok_then_silence(sock: socket.socket, *args: Any) -> None:
        send_frame(sock, {"ok": True, "error": None})
        time.sleep(10)

    prefill._transports["nccl"].serve_pull = ok_then_silence  # type: ignore[method-assign]
    lease, load = lease_and_load(prefill, "t-dead", remote=(3,), local=(4,))
    load = dataclasses.replace(load, remote_kv_device="cuda")
    prefill.on_metadata(meta(leases=[lease]))
    started = time.monotonic()
    decode.on_metadata(meta(loads=[load]))
    d_steps.until(lambda: load.engine_req_id in d_steps.recving, timeout_s=30)
    assert time.monotonic() - started < 10
    assert decode.get_block_ids_with_load_errors() == {4}
    assert decode._transports["nccl"]._client_pairs == {}  # type: ignore[attr-defined]
