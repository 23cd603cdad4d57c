"""The worker half on real CPU tensors shaped like vLLM's CPU KV cache and real loopback
sockets: a decode worker pulls a prefill worker's leased blocks byte for byte, and every
way a hand-over can end is reported to vLLM exactly once, in the step vLLM expects."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from shuffleinfer.kv import tcp, worker_side
from shuffleinfer.kv.channel import recv_exact_into, recv_frame, release, send_frame
from shuffleinfer.kv.metadata import Lease, PlannedLoad
from shuffleinfer.kv.transport import KVTransferError, PullRequest
from shuffleinfer.kv.worker_side import ConnectorWorker, KVCacheViews
from tests.kv.conftest import (
    NUM_BLOCKS,
    NUM_LAYERS,
    Steps,
    WorkerFactory,
    as_bytes,
    hand_over,
    kv_caches,
    lease_and_load,
    meta,
    pull,
)

pytestmark = pytest.mark.timeout(60)

@pytest.mark.parametrize("transport", ["tcp", "shm", "auto"])
@pytest.mark.parametrize(("prefill_stages", "decode_stages"), [
    (False, False), (True, True), (True, False), (False, True)],
    ids=["direct", "staged-both", "staged-prefill", "staged-decode"])
def test_decode_receives_the_leased_blocks_byte_for_byte(
        make_worker: WorkerFactory, prefill_stages: bool, decode_stages: bool,
        transport: str) -> None:
    # Staging through host memory is the accelerator path; forced here on CPU tensors so
    # the same gather/commit code runs in these tests.
    src, dst = kv_caches(seed=0), kv_caches(seed=1)
    src_before = {n: as_bytes(t) for n, t in src.items()}
    dst_before = {n: t.clone() for n, t in dst.items()}
    prefill = make_worker(src, stage_through_host=prefill_stages)
    decode = make_worker(dst, stage_through_host=decode_stages, transport=transport)
    lease, load = lease_and_load(prefill, "t1", remote=(2, 5, 3), local=(7, 1, 4))
    p_steps, d_steps = Steps(prefill), Steps(decode)

    # The lease arrives in the same step as vLLM's news that the request finished.
    prefill.on_metadata(meta(leases=[lease]))
    p_steps.step({lease.engine_req_id})
    decode.on_metadata(meta(loads=[load]))
    d_steps.until(lambda: load.engine_req_id in d_steps.recving)
    p_steps.until(lambda: lease.engine_req_id in p_steps.sending)

    for name in src:
        for remote_block, local_block in zip(load.remote_block_ids, load.local_block_ids,
                                             strict=True):
            assert as_bytes(dst[name][local_block]) == as_bytes(src[name][remote_block])
        for b in set(range(NUM_BLOCKS)) - set(load.local_block_ids):
            assert as_bytes(dst[name][b]) == as_bytes(dst_before[name][b])
        assert as_bytes(src[name]) == src_before[name]
    assert decode.get_block_ids_with_load_errors() == set()

    stats = decode.get_stats()
    assert stats is not None
    block_bytes = 3 * 128 * 128 * 2
    assert stats.data["num_transfers"] == 1 and stats.data["num_failures"] == 0
    assert stats.data["num_bytes"] == 3 * NUM_LAYERS * block_bytes
    used = "shm" if transport == "auto" else transport  # both workers on this host, CPU
    assert stats.data[f"num_transfers_{used}"] == 1
    assert stats.data[f"num_bytes_{used}"] == stats.data["num_bytes"]
    assert decode.get_stats() is None  # an interval's counters are reported once

    p_steps.idle(0.1)
    d_steps.idle(0.05)
    assert p_steps.sending == [lease.engine_req_id] and p_steps.recving == []
    assert d_steps.recving == [load.engine_req_id] and d_steps.sending == []


def test_metadata_bound_twice_in_a_step_pulls_once(make_worker: WorkerFactory) -> None:
    # start_load_kv and wait_for_save both hand over the same metadata object.
    prefill, decode = make_worker(kv_caches(0)), make_worker(kv_caches(1), lease_wait_s=0.3)
    lease, load = lease_and_load(prefill, "t-twice", remote=(1,), local=(2,))
    prefill.on_metadata(meta(leases=[lease]))
    step = meta(loads=[load])
    decode.on_metadata(step)
    decode.on_metadata(step)
    d_steps = Steps(decode)
    d_steps.until(lambda: load.engine_req_id in d_steps.recving)
    d_steps.idle(0.5)  # a second pull would be refused within lease_wait_s
    assert d_steps.recving == [load.engine_req_id]
    assert decode.get_block_ids_with_load_errors() == set()
    stats = decode.get_stats()
    assert stats is not None and stats.data["num_failures"] == 0


def test_finished_sending_waits_for_vllm_to_finish_the_request(
        make_worker: WorkerFactory) -> None:
    prefill, decode = make_worker(kv_caches(0)), make_worker(kv_caches(1))
    lease, load = lease_and_load(prefill, "t2", remote=(1, 2), local=(3, 4))
    p_steps, d_steps = Steps(prefill), Steps(decode)
    prefill.on_metadata(meta(leases=[lease]))
    decode.on_metadata(meta(loads=[load]))
    d_steps.until(lambda: load.engine_req_id in d_steps.recving)

    # Pulled, but vLLM has not said the request finished: reporting it now would break
    # vLLM's contract (finished_sending ids must come from finished_req_ids).
    p_steps.idle(0.2)
    assert p_steps.sending == []
    p_steps.step({"some-other-request"})
    p_steps.step({lease.engine_req_id})
    assert p_steps.sending == [lease.engine_req_id]
    p_steps.idle(0.05)
    assert p_steps.sending == [lease.engine_req_id]


def test_unpulled_lease_expires_and_frees_its_blocks(make_worker: WorkerFactory) -> None:
    prefill = make_worker(kv_caches(0), lease_s=0.2, lease_wait_s=0.2)
    decode = make_worker(kv_caches(1))
    lease, load = lease_and_load(prefill, "t-exp", remote=(1,), local=(2,))
    p_steps = Steps(prefill)
    started = time.monotonic()
    prefill.on_metadata(meta(leases=[lease]))
    p_steps.step({lease.engine_req_id})
    assert p_steps.sending == []
    p_steps.until(lambda: lease.engine_req_id in p_steps.sending, timeout_s=3)
    assert time.monotonic() - started >= 0.2
    stats = prefill.get_stats()
    assert stats is not None and stats.data["num_expired_leases"] == 1

    # A decode that comes too late gets nothing and recomputes.
    pull(decode, load)
    assert decode.get_block_ids_with_load_errors() == {2}


def test_pull_of_a_lease_that_never_appears_fails_within_the_wait(
        make_worker: WorkerFactory) -> None:
    dst = kv_caches(1)
    dst_before = {n: as_bytes(t) for n, t in dst.items()}
    prefill, decode = make_worker(kv_caches(0), lease_wait_s=0.3), make_worker(dst)
    _, load = lease_and_load(prefill, "t-ghost", remote=(1, 2, 3), local=(5, 6, 7))
    d_steps = Steps(decode)
    started = time.monotonic()
    decode.on_metadata(meta(loads=[load]))
    d_steps.until(lambda: load.engine_req_id in d_steps.recving, timeout_s=5)
    assert 0.3 <= time.monotonic() - started < 4.0  # the wait, not the 5 s pull timeout

    # vLLM reads the load errors right after get_finished in the same step.
    assert decode.get_block_ids_with_load_errors() == {5, 6, 7}
    assert decode.get_block_ids_with_load_errors() == set()
    assert {n: as_bytes(t) for n, t in dst.items()} == dst_before
    stats = decode.get_stats()
    assert stats is not None
    assert stats.data["num_failures"] == 1 and stats.data["num_transfers"] == 0


def test_lease_registered_while_the_pull_waits_is_served(make_worker: WorkerFactory) -> None:
    # The decode may dial before the prefill engine's next step registers the lease.
    src, dst = kv_caches(0), kv_caches(1)
    prefill, decode = make_worker(src, lease_wait_s=3.0), make_worker(dst)
    lease, load = lease_and_load(prefill, "t-race", remote=(6,), local=(1,))
    d_steps = Steps(decode)
    decode.on_metadata(meta(loads=[load]))
    time.sleep(0.2)
    prefill.on_metadata(meta(leases=[lease]))
    d_steps.until(lambda: load.engine_req_id in d_steps.recving)
    assert decode.get_block_ids_with_load_errors() == set()
    name = next(iter(src))
    assert as_bytes(dst[name][1]) == as_bytes(src[name][6])


def _pull_directly(prefill: ConnectorWorker, transfer_id: str, block_ids: tuple[int, ...],
                   layout: dict[str, object], timeout_s: float = 5.0) -> None:
    host, port = prefill.address
    num_views = len(block_ids) * int(layout["num_layers"])  # type: ignore[call-overload]
    views = [memoryview(bytearray(int(layout["block_bytes"])))  # type: ignore[call-overload]
             for _ in range(num_views)]
    tcp.pull(host, port, PullRequest(transfer_id, block_ids, layout), views, timeout_s)


@pytest.mark.parametrize(("peer_caches", "field"), [
    (dict(num_layers=NUM_LAYERS - 1), "num_layers"),
    (dict(block_size=64), "block_bytes"),
    (dict(dtype=torch.float16), "dtype"),
    (dict(kv_heads=6, block_size=64), "block_shape"),  # same bytes per block, other shape
])
def test_layout_mismatch_is_refused_naming_the_field(
        make_worker: WorkerFactory, peer_caches: dict[str, object], field: str) -> None:
    src, dst = kv_caches(0), kv_caches(1)
    prefill = make_worker(src)
    lease, load = lease_and_load(prefill, "t-layout", remote=(1,), local=(2,))
    prefill.on_metadata(meta(leases=[lease]))
    peer_caches_ = kv_caches(2, **peer_caches)  # type: ignore[arg-type]
    peer_layout = KVCacheViews(peer_caches_, num_blocks=NUM_BLOCKS).layout

    with pytest.raises(KVTransferError, match=f"layout mismatch: {field} is"):
        _pull_directly(prefill, "t-layout", (1,), peer_layout)

    # The refusal does not consume the lease: a matching decode still gets the blocks.
    decode = make_worker(dst)
    pull(decode, load)
    assert decode.get_block_ids_with_load_errors() == set()
    name = next(iter(src))
    assert as_bytes(dst[name][2]) == as_bytes(src[name][1])


@pytest.mark.parametrize(("peer", "field"), [
    ({"model": "Qwen2.5-0.5B-Instruct", "tp_size": 1}, "model"),
    ({"model": "SmolLM2-135M-Instruct", "tp_size": 2}, "tp_size"),
])
def test_handshake_refuses_another_model_or_tensor_parallel_size_naming_it(
        make_worker: WorkerFactory, peer: dict[str, object], field: str) -> None:
    identity = {"model": "SmolLM2-135M-Instruct", "tp_size": 1}
    src, dst = kv_caches(0), kv_caches(1)
    prefill = make_worker(src, identity=identity)
    wrong = make_worker(kv_caches(2), identity=peer)
    lease, load = lease_and_load(prefill, "t-id", remote=(1,), local=(2,))
    prefill.on_metadata(meta(leases=[lease]))

    steps = pull(wrong, load)  # refused: the decode recomputes, the lease stays
    assert wrong.get_block_ids_with_load_errors() == {2}
    assert steps.recving == [load.engine_req_id]
    with pytest.raises(KVTransferError, match=f"layout mismatch: {field} is"):
        _pull_directly(prefill, "t-id", (1,), KVCacheViews(kv_caches(3), num_blocks=NUM_BLOCKS,
                                                           identity=peer).layout)

    right = make_worker(dst, identity=identity)
    pull(right, load)
    assert right.get_block_ids_with_load_errors() == set()
    name = next(iter(src))
    assert as_bytes(dst[name][2]) == as_bytes(src[name][1])


def test_second_pull_of_a_lease_is_refused(make_worker: WorkerFactory) -> None:
    # 32 MiB of blocks: more than loopback socket buffers hold, so a first pull that is
    # not read stays in flight.
    src = kv_caches(0, num_layers=4, kv_heads=4, block_size=1024)
    prefill = make_worker(src, lease_wait_s=0.3)
    layout = KVCacheViews(src, num_blocks=NUM_BLOCKS).layout
    all_blocks = tuple(range(NUM_BLOCKS))
    prefill.on_metadata(meta(leases=[Lease("t-once", "pre-once", all_blocks)]))

    # While one pull is being served, another is refused at once.
    with socket.create_connection(prefill.address, timeout=5) as first:
        send_frame(first, {"op": "pull", "transfer_id": "t-once",
                               "block_ids": list(all_blocks), "layout": layout})
        assert recv_frame(first)["ok"]
        # "already pulled", not "no lease" after lease_wait_s: refused without waiting.
        with pytest.raises(KVTransferError, match="already pulled"):
            _pull_directly(prefill, "t-once", (1,), layout)
        name = sorted(src)[0]
        got = bytearray(KVCacheViews(src, num_blocks=NUM_BLOCKS).block_bytes)
        recv_exact_into(first, memoryview(got))
        assert bytes(got) == as_bytes(src[name][0])

    # Once served, the lease is gone: a later pull fails and the decode recomputes.
    dst = kv_caches(1, num_layers=4, kv_heads=4, block_size=1024)
    dst_before = {n: as_bytes(t) for n, t in dst.items()}
    decode = make_worker(dst)
    host, port = prefill.address
    again = PlannedLoad("t-once", "dec-once", host, port, (1, 2), (3, 4))
    decode.on_metadata(meta(loads=[again]))
    d_steps = Steps(decode)
    d_steps.until(lambda: again.engine_req_id in d_steps.recving)
    assert decode.get_block_ids_with_load_errors() == {3, 4}
    assert {n: as_bytes(t) for n, t in dst.items()} == dst_before


def test_released_lease_is_reported_and_no_longer_pullable(make_worker: WorkerFactory) -> None:
    src = kv_caches(0)
    prefill = make_worker(src, lease_wait_s=0.2)
    lease, _ = lease_and_load(prefill, "t-rel", remote=(4,), local=(5,))
    p_steps = Steps(prefill)
    prefill.on_metadata(meta(leases=[lease]))
    p_steps.step({lease.engine_req_id})
    release(*prefill.address, "t-rel")
    p_steps.step()
    assert p_steps.sending == [lease.engine_req_id]
    with pytest.raises(KVTransferError, match="no lease"):
        _pull_directly(prefill, "t-rel", (4,), KVCacheViews(src, num_blocks=NUM_BLOCKS).layout)


def test_pull_of_blocks_outside_the_lease_is_refused(make_worker: WorkerFactory) -> None:
    src = kv_caches(0)
    prefill = make_worker(src)
    lease, _ = lease_and_load(prefill, "t-scope", remote=(1, 2), local=(3, 4))
    prefill.on_metadata(meta(leases=[lease]))
    with pytest.raises(KVTransferError, match=r"blocks \[6\] are not in the lease"):
        _pull_directly(prefill, "t-scope", (1, 6), KVCacheViews(src, num_blocks=NUM_BLOCKS).layout)


def test_finished_ids_without_a_lease_are_not_kept_forever(
        make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every request an engine finishes passes through get_finished; most never lease.
    monkeypatch.setattr(worker_side, "_FINISHED_MEMORY_S", 0.05)
    prefill, decode = make_worker(kv_caches(0)), make_worker(kv_caches(1))
    lease, load = lease_and_load(prefill, "t-late", remote=(1,), local=(2,))
    p_steps = Steps(prefill)
    prefill.on_metadata(meta(leases=[lease]))
    p_steps.step({lease.engine_req_id} | {f"plain-{i}" for i in range(5000)})
    p_steps.idle(0.1)
    assert len(prefill._finished_seen) <= 1  # only the leased request is remembered

    # The leased request's finish is still remembered when its pull comes late.
    pull(decode, load)
    p_steps.until(lambda: lease.engine_req_id in p_steps.sending)


@pytest.mark.parametrize(("caches", "reason"), [
    # A block must be whole bytes in memory: no dim that repeats memory (stride 0)...
    ({"model.layers.0.self_attn.attn": torch.zeros(NUM_BLOCKS, 1, 128, 128)
      .expand(NUM_BLOCKS, 3, 128, 128)}, "overlap in memory"),
    # ...nor gaps inside its innermost dim...
    ({"model.layers.0.self_attn.attn": torch.zeros(NUM_BLOCKS, 3, 128, 256)[..., ::2]},
     "no byte view of its blocks"),
    # ...and all layers' blocks alike.
    ({"model.layers.0.self_attn.attn": torch.zeros(NUM_BLOCKS, 3, 128, 128),
      "model.layers.1.self_attn.attn": torch.zeros(NUM_BLOCKS, 3, 64, 128)},
     "model.layers.1.self_attn.attn has blocks"),
])
def test_register_rejects_caches_the_wire_cannot_serve(
        caches: dict[str, torch.Tensor], reason: str) -> None:
    worker = ConnectorWorker("127.0.0.1", 0, lease_s=1.0, pull_timeout_s=1.0)
    try:
        with pytest.raises(ValueError, match=reason):
            worker.register_kv_caches(caches, num_blocks=NUM_BLOCKS)
    finally:
        worker.shutdown()


def test_register_serves_a_cache_whose_blocks_are_not_contiguous_tensors(
        make_worker: WorkerFactory) -> None:
    # FlashAttention's [B, H, N, C] view on a GPU is stored as [B, N, H, C]: not a
    # contiguous tensor, yet every block is whole bytes in memory.
    src = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in kv_caches(0).items()}
    dst = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in kv_caches(1).items()}
    assert not next(iter(src.values())).is_contiguous()
    prefill, decode = make_worker(src), make_worker(dst)
    lease, load = lease_and_load(prefill, "t-strided", remote=(3,), local=(5,))
    hand_over(prefill, decode, lease, load)
    assert decode.get_block_ids_with_load_errors() == set()
    for name in src:
        assert as_bytes(dst[name][5]) == as_bytes(src[name][3])
