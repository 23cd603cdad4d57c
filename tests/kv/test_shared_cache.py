"""A CPU KV cache in shared memory: vLLM's views follow it when it moves, the decode side
copies straight out of the prefill's cache while the lease holds, and a decode that
cannot map it loses one pull (recomputed) and then copies through a segment."""

from __future__ import annotations

import pytest
import torch

from shuffleinfer.kv.shared_cache import PeerCaches, SharedCache, address_of
from shuffleinfer.kv.shm import ShmTransport
from shuffleinfer.kv.transport import KVTransferError, Peer, PullRequest
from shuffleinfer.kv.worker_side import ConnectorWorker
from tests.kv.conftest import (
    FakeSource,
    Steps,
    WorkerFactory,
    as_bytes,
    hand_over,
    lease_and_load,
    meta,
    pull,
    serve,
    shm_segments,
    vllm_kv_caches,
)

pytestmark = pytest.mark.timeout(60)


def test_views_taken_before_the_move_see_the_shared_memory() -> None:
    caches = vllm_kv_caches(0, "LBHNC")
    layer = next(iter(caches.values()))
    held = layer[2]  # as an attention layer holds its cache
    before = as_bytes(layer)
    shared = SharedCache.share(caches)
    assert layer.untyped_storage().is_shared()
    assert as_bytes(layer) == before  # the bytes moved with it
    held.fill_(7)  # the engine writes through the view it already had
    # ... and a process mapping the shared memory, as a decode does, reads it there.
    block = layer[2].view(torch.uint8).reshape(-1)
    runs = shared.runs([(block.data_ptr(), block.numel())])
    dest = bytearray(block.numel())
    caches = PeerCaches()
    caches.copy_runs("me", shared.described, runs, [(address_of(memoryview(dest)), len(dest))])
    caches.close()
    assert bytes(dest) == as_bytes(layer[2]) != before[:len(dest)]


def _hand_over_and_check(prefill: ConnectorWorker, decode: ConnectorWorker,
                         src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor],
                         prefix: str, pulls: list[tuple[tuple[int, ...], tuple[int, ...]]]
                         ) -> None:
    """Hand each (remote, local) block list of `pulls` over in turn; check the bytes."""
    for i, (remote, local) in enumerate(pulls):
        lease, load = lease_and_load(prefill, f"{prefix}-{i}", remote=remote, local=local)
        hand_over(prefill, decode, lease, load)
        assert decode.get_block_ids_with_load_errors() == set()
        for name in src:
            for r, lb in zip(remote, local, strict=True):
                assert as_bytes(dst[name][lb]) == as_bytes(src[name][r])


def test_an_shm_pull_copies_straight_from_the_prefills_cache(
        make_worker: WorkerFactory) -> None:
    before = shm_segments()
    src, dst = vllm_kv_caches(0, "LBHNC"), vllm_kv_caches(1, "LBHNC")
    prefill = make_worker(src, block_dim=0)
    decode = make_worker(dst, block_dim=0, transport="shm")
    _hand_over_and_check(prefill, decode, src, dst, "t-direct",
                         [((4, 5, 6), (0, 1, 2)), ((7, 1), (3, 6))])
    # No segment of the decode's carried the bytes: none is kept for this prefill (the
    # two-copy path keeps one per prefill, test_worker_transports).
    assert shm_segments() - before == set()


def test_a_pull_copies_while_its_request_is_on_the_way_only_under_a_live_lease(
        make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from shuffleinfer.kv import shm

    claims: list[object] = []
    where_mapped = shm.where_mapped
    monkeypatch.setattr(shm, "where_mapped", lambda header, *args: (
        claims.append(header.get("claimed")), where_mapped(header, *args))[1])
    src, dst = vllm_kv_caches(0, "LBHNC"), vllm_kv_caches(1, "LBHNC")
    prefill = make_worker(src, block_dim=0, lease_s=0.2, lease_wait_s=0.2)
    decode = make_worker(dst, block_dim=0, transport="shm")
    _hand_over_and_check(prefill, decode, src, dst, "t-claim",
                         [((4, 5), (0, 1)), ((7, 2, 3), (4, 5, 6))])
    # The first pull learnt where the cache's blocks lie; the second copied meanwhile.
    assert claims[0] is None and isinstance(claims[1], str)
    # A lease that expired: its blocks go to another request, which writes them. The
    # decode copies them ahead of the reply all the same, but the server refuses: the
    # pull fails and its blocks are recomputed, never decoded from.
    lease, load = lease_and_load(prefill, "t-claim-late", remote=(4,), local=(2,))
    prefill.on_metadata(meta(leases=[lease]))
    steps = Steps(prefill)
    steps.step({lease.engine_req_id})
    steps.until(lambda: lease.engine_req_id in steps.sending)
    for cache in src.values():
        cache[4].fill_(3)
    pull(decode, load)
    assert isinstance(claims[-1], str)
    assert decode.get_block_ids_with_load_errors() == {2}


class _UnmappableSource(FakeSource):
    """Claims a shared cache no process can open (a pid that does not exist)."""

    def shared_for_pull(self, request: PullRequest, claimed: str | None = None
                        ) -> tuple[dict[str, object], list[list[int]] | None] | None:
        self.requests.append(request)
        return {"id": "x", "pid": 2**22 + 1, "regions": [[3, 4096]]}, [[0, 0, 10]]


def test_a_decode_that_cannot_map_the_cache_fails_once_then_copies_twice() -> None:
    source = _UnmappableSource({0: bytearray(b"k" * 10)})
    transport = ShmTransport()
    dest = bytearray(10)
    with serve(source) as (host, port):
        peer = Peer(host, port)
        with pytest.raises(KVTransferError, match="cannot map"):
            transport.pull_views(peer, PullRequest("t0", (0,), {}), [memoryview(dest)], 5)
        assert source.done_event.wait(5)
        assert source.done == [("t0", False)]  # the lease ended at once, not at expiry
        transport.pull_views(peer, PullRequest("t1", (0,), {}), [memoryview(dest)], 5)
    transport.close()
    assert dest == b"k" * 10
    assert source.done[-1] == ("t1", True)


def test_a_cache_too_big_for_dev_shm_stays_private(monkeypatch: pytest.MonkeyPatch) -> None:
    from shuffleinfer.kv import shared_cache

    caches = vllm_kv_caches(0, "LBHNC")
    layer = next(iter(caches.values()))
    needed = layer.untyped_storage().nbytes()
    monkeypatch.setattr(shared_cache, "shm_free_bytes", lambda: 2 * needed - 1)
    assert SharedCache.share(caches) is None
    assert not layer.untyped_storage().is_shared()
    monkeypatch.setattr(shared_cache, "shm_free_bytes", lambda: 2 * needed)
    assert SharedCache.share(caches) is not None
    assert layer.untyped_storage().is_shared()
