"""The nccl transport. On CPU: it imports, refuses what it cannot do with a clear error
(the pull's failure path), never hangs. With two CUDA GPUs (`gpu` marker): a real pull
between two workers, the pair reused, and a dead peer failing the pull within its timeout."""

from __future__ import annotations

import dataclasses
import queue
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from shuffleinfer.kv import nccl
from shuffleinfer.kv.block_views import VLLM_BLOCK_DIM, KVCacheViews
from shuffleinfer.kv.channel import KVServer, connect, recv_frame, send_frame
from shuffleinfer.kv.nccl import NcclTransport
from shuffleinfer.kv.transport import KVTransferError, Peer, PullRequest
from tests.kv.conftest import (
    NUM_BLOCKS,
    NUM_LAYERS,
    FakeSource,
    Steps,
    WorkerFactory,
    as_bytes,
    kv_caches,
    lease_and_load,
    meta,
    serve,
    vllm_kv_caches,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cpu_nccl_server() -> Iterator[tuple[FakeSource, str, int]]:

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
    kv = KVCacheViews(kv_caches(0), num_blocks=NUM_BLOCKS)
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


# --- the set-up and pull protocol, with NCCL faked by in-process queues ------------------

class _FakeComm:
    """Stands in for PyNcclCommunicator: rows travel through a queue per pair."""

    queues: dict[str, queue.Queue[list[torch.Tensor]]] = {}

    def __init__(self, pair_id: str) -> None:
        self.queue = self.queues.setdefault(pair_id, queue.Queue())
        self.destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


def _fake_join(host: str, port: int, rank: int, device: torch.device, pair_id: str,
               timeout_s: float, listen_socket: socket.socket | None = None) -> nccl._Pair:
    if listen_socket is not None:
        listen_socket.close()
    return nccl._Pair(pair_id, _FakeComm(pair_id), stream=None)


def _fake_run_p2p(pair: nccl._Pair, rows: list[torch.Tensor], send: bool,
                  timeout_s: float) -> None:
    if send:
        pair.comm.queue.put([r.clone() for r in rows])
        return
    try:
        for row, got in zip(rows, pair.comm.queue.get(timeout=timeout_s), strict=True):
            row.copy_(got)
    except queue.Empty:
        pair.abort()
        raise KVTransferError("NCCL transfer timed out (fake)") from None


class _CudaLookingViews(KVCacheViews):
    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


class _RowSource(FakeSource):
    def __init__(self, kv: KVCacheViews) -> None:
        super().__init__({})
        self.kv = kv

    def rows_for_pull(self, request: PullRequest) -> list[torch.Tensor]:
        self.requests.append(request)
        return self.kv.read_rows(request.block_ids)


@pytest.fixture
def fake_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nccl, "_check_nccl", lambda: None)
    monkeypatch.setattr(nccl, "_join", _fake_join)
    monkeypatch.setattr(nccl, "_run_p2p", _fake_run_p2p)


@pytest.mark.usefixtures("fake_nccl")
def test_pair_is_set_up_once_then_each_pull_moves_rows_between_the_caches() -> None:
    src, dst = kv_caches(0), kv_caches(1)
    source = _RowSource(KVCacheViews(src, num_blocks=NUM_BLOCKS))
    kv = _CudaLookingViews(dst, num_blocks=NUM_BLOCKS)
    server_side = NcclTransport(torch.device("cpu"), "127.0.0.1", auth_token="tok")
    client_side = NcclTransport(torch.device("cpu"), "127.0.0.1", auth_token="tok")

    server = KVServer("127.0.0.1", 0, source, {"nccl": server_side}, auth_token="tok")
    server.start()
    try:
        peer = Peer(*server.address)
        for tid, remote, local in [("t1", (1, 5), (2, 3)), ("t2", (7,), (0,))]:
            nbytes = client_side.pull(peer, PullRequest(tid, remote, kv.layout), kv, local, 5)
            assert nbytes == len(remote) * NUM_LAYERS * kv.block_bytes
            for name in src:
                for r, lb in zip(remote, local, strict=True):
                    assert as_bytes(dst[name][lb]) == as_bytes(src[name][r])
            assert source.done_event.wait(5)
            source.done_event.clear()
        assert [d[0] for d in source.done] == ["t1", "t2"]
        assert len(client_side._client_pairs) == 1 and len(server_side._server_pairs) == 1

        # The server forgets the pair (e.g. it restarted): the pull fails, the client drops
        # its pair, and the next pull sets up a new one.
        server_side._server_pairs.clear()
        with pytest.raises(KVTransferError, match="unknown nccl pair"):
            client_side.pull(peer, PullRequest("t3", (2,), kv.layout), kv, (4,), 5)
        assert client_side._client_pairs == {}
        client_side.pull(peer, PullRequest("t4", (2,), kv.layout), kv, (4,), 5)
        assert len(server_side._server_pairs) == 1
    finally:
        server.close()
        server_side.close()
        client_side.close()


@pytest.mark.usefixtures("fake_nccl")
@pytest.mark.parametrize("layout", ["LBNHC", "LHBNC"])
def test_rows_carry_whole_blocks_of_vllm_layouts(layout: str) -> None:
    # LBNHC: FlashAttention's default on GPUs, one row per block; LHBNC: one per head.
    src, dst = vllm_kv_caches(0, layout), vllm_kv_caches(1, layout)
    source = _RowSource(KVCacheViews(src, num_blocks=NUM_BLOCKS, block_dim=VLLM_BLOCK_DIM))
    kv = _CudaLookingViews(dst, num_blocks=NUM_BLOCKS, block_dim=VLLM_BLOCK_DIM)
    before = {name: t.clone() for name, t in dst.items()}
    server_side = NcclTransport(torch.device("cpu"), "127.0.0.1")
    client_side = NcclTransport(torch.device("cpu"), "127.0.0.1")
    server = KVServer("127.0.0.1", 0, source, {"nccl": server_side})
    server.start()
    try:
        remote, local = (6, 0, 3), (1, 7, 4)
        nbytes = client_side.pull(Peer(*server.address), PullRequest("t", remote, kv.layout),
                                  kv, local, 5)
    finally:
        server.close()
        server_side.close()
        client_side.close()
    assert nbytes == len(remote) * len(src) * kv.block_bytes
    for name in src:
        for b in range(NUM_BLOCKS):
            expected = src[name][remote[local.index(b)]] if b in local else before[name][b]
            assert as_bytes(dst[name][b]) == as_bytes(expected)


@pytest.mark.usefixtures("fake_nccl")
def test_connect_without_the_token_sets_nothing_up() -> None:
    source = _RowSource(KVCacheViews(kv_caches(0), num_blocks=NUM_BLOCKS))
    server_side = NcclTransport(torch.device("cpu"), "127.0.0.1", auth_token="tok")

    server = KVServer("127.0.0.1", 0, source, {"nccl": server_side}, auth_token="tok")
    server.start()
    try:
        intruder = NcclTransport(torch.device("cpu"), "127.0.0.1", auth_token="nope")
        kv = _CudaLookingViews(kv_caches(1), num_blocks=NUM_BLOCKS)
        with pytest.raises(KVTransferError, match="unauthorized"):
            intruder.pull(Peer(*server.address), PullRequest("t", (1,), kv.layout), kv, (2,), 5)
        assert server_side._server_pairs == {} and source.requests == []
        assert len(source.unauthorized) == 1
    finally:
        server.close()
        server_side.close()


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
