"""Overlap mode on real workers: a prefill's blocks are staged chunk by chunk after each
forward pass, pulls read the staged bytes (shm by mapping the staging segment, tcp by
sending from it), blocks freed under a copy are fenced, and staging is bounded."""

from __future__ import annotations

import pytest

from shuffleinfer.kv.metadata import Lease, ShuffleConnectorMetadata, StageBlocks
from shuffleinfer.kv.staging import copy_views
from shuffleinfer.kv.worker_side import ConnectorWorker
from tests.kv.conftest import (
    WorkerFactory,
    as_bytes,
    kv_caches,
    lease_and_load,
    meta,
    pull,
    shm_segments,
)

pytestmark = pytest.mark.timeout(60)

STAGING = 64 << 20


def step(worker: ConnectorWorker, **news: list) -> None:  # type: ignore[type-arg]
    """One engine step as the connector drives the worker: news before the forward
    pass, staging after it."""
    m = ShuffleConnectorMetadata(**news)
    worker.on_metadata(m)
    worker.after_forward(m)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_prompt_staged_chunk_by_chunk_arrives_from_the_staged_bytes(
        make_worker: WorkerFactory, transport: str) -> None:
    src, dst = kv_caches(0), kv_caches(1)
    expected = {name: [as_bytes(src[name][b]) for b in (5, 1, 6)] for name in src}
    prefill = make_worker(src, staging_bytes=STAGING)
    decode = make_worker(dst, transport=transport)
    # Chunk 1 completes block 5 (index 0), chunk 2 block 1; the lease adds the last, 6.
    step(prefill, stage=[StageBlocks("t-o", 3, 0, (5,))])
    step(prefill, stage=[StageBlocks("t-o", 3, 1, (1,))])
    prefill.stager.fence(["t-o"])  # type: ignore[union-attr]
    for name in src:  # the engine reuses the staged blocks: the staged copies must serve
        src[name][5].zero_()
        src[name][1].zero_()
    lease, load = lease_and_load(prefill, "t-o", remote=(5, 1, 6), local=(2, 7, 0))
    step(prefill, new_leases=[lease])
    pull(decode, load)

    assert decode.get_block_ids_with_load_errors() == set()
    for name in src:
        assert [as_bytes(dst[name][b]) for b in (2, 7, 0)] == expected[name]
    assert prefill.stager.num_staged == 0  # type: ignore[union-attr]  # ended with the lease
    prefill_stats = prefill.get_stats()
    assert prefill_stats is not None and prefill_stats.data["num_overlapped_blocks"] == 2
    stats = decode.get_stats()
    assert stats is not None and stats.data[f"num_transfers_{transport}"] == 1


def test_a_decode_with_a_prefix_hit_pulls_only_the_tail_of_the_staged_prompt(
        make_worker: WorkerFactory) -> None:
    src, dst = kv_caches(0), kv_caches(1)
    prefill = make_worker(src, staging_bytes=STAGING)
    decode = make_worker(dst)
    step(prefill, stage=[StageBlocks("t-tail", 4, 0, (3, 4, 0, 2))])
    _, load = lease_and_load(prefill, "t-tail", remote=(0, 2), local=(6, 7))
    step(prefill, new_leases=[Lease("t-tail", "pre-t-tail", (3, 4, 0, 2))])
    pull(decode, load)

    assert decode.get_block_ids_with_load_errors() == set()
    for name in src:
        assert as_bytes(dst[name][6]) == as_bytes(src[name][0])
        assert as_bytes(dst[name][7]) == as_bytes(src[name][2])


def test_a_dropped_prefill_frees_its_staging_and_the_segment_is_reused(
        make_worker: WorkerFactory) -> None:
    before = shm_segments()
    prefill = make_worker(kv_caches(0), staging_bytes=STAGING)
    stager = prefill.stager
    assert stager is not None
    step(prefill, stage=[StageBlocks("t-gone", 2, 0, (1,))])
    assert stager.num_staged == 1
    step(prefill, dropped=["t-gone"])  # aborted mid-prefill: no lease will come
    assert stager.num_staged == 0
    step(prefill, stage=[StageBlocks("t-next", 2, 0, (4,))])
    step(prefill, dropped=["t-next"])
    assert len(shm_segments() - before) == 1  # one staging segment, kept for reuse


def test_staging_past_its_bound_falls_back_to_pulling_the_blocks(
        make_worker: WorkerFactory) -> None:
    src, dst = kv_caches(0), kv_caches(1)
    block_bytes = sum(t[0].numel() * t.element_size() for t in src.values())
    prefill = make_worker(src, staging_bytes=2 * block_bytes)  # room for one 2-block prompt
    decode = make_worker(dst)
    step(prefill, stage=[StageBlocks("t-a", 2, 0, (0,)), StageBlocks("t-b", 2, 0, (1,))])
    assert prefill.stager is not None and prefill.stager.num_staged == 1
    for tid, remote, local in (("t-a", (0, 3), (4, 5)), ("t-b", (1, 2), (6, 7))):
        lease, load = lease_and_load(prefill, tid, remote=remote, local=local)
        step(prefill, new_leases=[lease])
        pull(decode, load)
        for name in src:
            assert [as_bytes(dst[name][b]) for b in local] == \
                [as_bytes(src[name][b]) for b in remote]
    assert decode.get_block_ids_with_load_errors() == set()


def test_whole_mode_stages_nothing(make_worker: WorkerFactory) -> None:
    prefill = make_worker(kv_caches(0))
    assert prefill.stager is None
    step(prefill, stage=[StageBlocks("t-w", 2, 0, (0,))])  # ignored
    prefill.on_metadata(meta())


def test_copy_views_walks_differently_cut_buffers() -> None:
    src = [memoryview(bytes(range(10))), memoryview(bytes(range(10, 16)))]
    dst = [memoryview(bytearray(4)), memoryview(bytearray(7)), memoryview(bytearray(5))]
    assert copy_views(src, dst) == 16
    assert b"".join(bytes(v) for v in dst) == bytes(range(16))
    with pytest.raises(ValueError, match="cannot fill"):
        copy_views(src, dst[:2])
