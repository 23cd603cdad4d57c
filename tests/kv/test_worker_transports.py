"""The worker half picks a transport per pair at pull time: auto follows where the pair
lives, a forced transport that cannot work takes the failure path (recompute, counted,
logged) at once, and the auth token guards every lease."""

from __future__ import annotations

import dataclasses
import time

import pytest

from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.tcp import pull as tcp_pull
from shuffleinfer.kv.transport import KVTransferError, PullRequest
from tests.kv.conftest import (
    NUM_BLOCKS,
    Steps,
    WorkerFactory,
    as_bytes,
    hand_over,
    kv_caches,
    lease_and_load,
    meta,
    pull,
    shm_segments,
)

pytestmark = pytest.mark.timeout(60)

OTHER_HOST = "another-machine/0000/1"


@pytest.mark.parametrize(("transport", "remote_host", "used"), [
    ("auto", None, "shm"),  # None: the prefill's real identity, i.e. this host
    ("auto", OTHER_HOST, "tcp"),
    ("tcp", None, "tcp"),
])
def test_auto_follows_where_the_prefill_lives(
        make_worker: WorkerFactory, transport: str, remote_host: str | None,
        used: str) -> None:
    # A prefill on "another host" is still reachable on loopback, so tcp really runs.
    src, dst = kv_caches(0), kv_caches(1)
    prefill = make_worker(src)
    decode = make_worker(dst, transport=transport)
    lease, load = lease_and_load(prefill, "t-auto", remote=(1, 3), local=(2, 6))
    if remote_host is not None:
        load = dataclasses.replace(load, remote_host_id=remote_host)
    hand_over(prefill, decode, lease, load)

    assert decode.get_block_ids_with_load_errors() == set()
    for name in src:
        assert as_bytes(dst[name][6]) == as_bytes(src[name][3])
    stats = decode.get_stats()
    assert stats is not None
    assert stats.data[f"num_transfers_{used}"] == 1
    assert sum(stats.data[f"num_transfers_{t}"] for t in ("tcp", "shm", "nccl")) == 1


@pytest.mark.parametrize(("transport", "remote_host", "reason"), [
    ("shm", OTHER_HOST, "shm forced, but the prefill is on another host"),
    ("nccl", None, "nccl forced, but the KV caches are on cpu"),
])
def test_forced_transport_that_cannot_work_recomputes_at_once(
        make_worker: WorkerFactory, transport: str, remote_host: str | None, reason: str,
        caplog: pytest.LogCaptureFixture) -> None:
    src, dst = kv_caches(0), kv_caches(1)
    dst_before = {n: as_bytes(t) for n, t in dst.items()}
    prefill = make_worker(src)
    decode = make_worker(dst, transport=transport)
    lease, load = lease_and_load(prefill, "t-forced", remote=(1, 2), local=(4, 5))
    if remote_host is not None:
        load = dataclasses.replace(load, remote_host_id=remote_host)
    prefill.on_metadata(meta(leases=[lease]))
    d_steps = Steps(decode)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="shuffleinfer.kv.worker_side"):
        decode.on_metadata(meta(loads=[load]))
        d_steps.until(lambda: load.engine_req_id in d_steps.recving, timeout_s=3)
    assert time.monotonic() - started < 1.0  # no dial, no wait for a timeout

    assert decode.get_block_ids_with_load_errors() == {4, 5}
    assert {n: as_bytes(t) for n, t in dst.items()} == dst_before
    assert reason in caplog.text and "t-forced" in caplog.text
    stats = decode.get_stats()
    assert stats is not None
    assert stats.data["num_failures"] == 1 and stats.data[f"num_failures_{transport}"] == 1
    assert stats.data["num_transfers"] == 0


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_wrong_token_is_refused_and_the_lease_still_serves_the_right_one(
        make_worker: WorkerFactory, transport: str) -> None:
    src, dst = kv_caches(0), kv_caches(1)
    dst_before = {n: as_bytes(t) for n, t in dst.items()}
    prefill = make_worker(src, auth_token="s3cret", lease_wait_s=0.3)
    lease, load = lease_and_load(prefill, "t-auth", remote=(1, 2), local=(3, 4))
    prefill.on_metadata(meta(leases=[lease]))

    intruder = make_worker(dst, transport=transport, auth_token="guess")
    intruder.on_metadata(meta(loads=[load]))
    i_steps = Steps(intruder)
    i_steps.until(lambda: load.engine_req_id in i_steps.recving)
    assert intruder.get_block_ids_with_load_errors() == {3, 4}
    assert {n: as_bytes(t) for n, t in dst.items()} == dst_before
    prefill_stats = prefill.get_stats()
    assert prefill_stats is not None and prefill_stats.data["num_unauthorized"] == 1

    decode = make_worker(dst, transport=transport, auth_token="s3cret")
    pull(decode, load)
    assert decode.get_block_ids_with_load_errors() == set()
    for name in src:
        assert as_bytes(dst[name][4]) == as_bytes(src[name][2])


def test_token_less_direct_pull_does_not_reach_the_lease(make_worker: WorkerFactory) -> None:
    src = kv_caches(0)
    prefill = make_worker(src, auth_token="s3cret", lease_wait_s=0.3)
    lease, _ = lease_and_load(prefill, "t-direct", remote=(5,), local=(6,))
    prefill.on_metadata(meta(leases=[lease]))
    layout = KVCacheViews(src, num_blocks=NUM_BLOCKS).layout
    views = [memoryview(bytearray(int(layout["block_bytes"])))  # type: ignore[call-overload]
             for _ in range(int(layout["num_layers"]))]  # type: ignore[call-overload]
    with pytest.raises(KVTransferError, match="unauthorized"):
        tcp_pull(*prefill.address, PullRequest("t-direct", (5,), layout), views, 5)
    # Not "already pulled": the refused request never marked the lease as served.
    tcp_pull(*prefill.address, PullRequest("t-direct", (5,), layout), views, 5,
             auth_token="s3cret")
    assert bytes(views[0]) == as_bytes(src[sorted(src)[0]][5])


def test_shm_keeps_one_segment_per_prefill_and_unlinks_it_at_shutdown(
        make_worker: WorkerFactory) -> None:
    before = shm_segments()
    src, dst = kv_caches(0), kv_caches(1)
    # Two copies through a segment: the path when the prefill's cache is not shared.
    prefill = make_worker(src, lease_wait_s=0.2, share_cache=False)
    decode = make_worker(dst, transport="shm")
    d_steps = Steps(decode)
    kept = set()
    for i, (remote, local) in enumerate([((1,), (2,)), ((3, 4), (5, 6)), ((7,), (0,))]):
        lease, load = lease_and_load(prefill, f"t-{i}", remote=remote, local=local)
        prefill.on_metadata(meta(leases=[lease]))
        decode.on_metadata(meta(loads=[load]))
        d_steps.until(lambda load=load: load.engine_req_id in d_steps.recving)
        for name in src:
            for r, lb in zip(remote, local, strict=True):
                assert as_bytes(dst[name][lb]) == as_bytes(src[name][r])
        kept |= shm_segments() - before
    assert len(kept) == 1  # the same segment for every pull from this prefill

    # A failed pull (no such lease) gives the segment it used up at once.
    _, ghost = lease_and_load(prefill, "t-ghost", remote=(3,), local=(4,))
    decode.on_metadata(meta(loads=[ghost]))
    d_steps.until(lambda: ghost.engine_req_id in d_steps.recving)
    assert decode.get_block_ids_with_load_errors() == {4}
    assert shm_segments() - before == set()

    # The next good pull makes a new one, which lives until the decode worker shuts down.
    lease, load = lease_and_load(prefill, "t-again", remote=(2,), local=(3,))
    prefill.on_metadata(meta(leases=[lease]))
    decode.on_metadata(meta(loads=[load]))
    d_steps.until(lambda: load.engine_req_id in d_steps.recving)
    assert len(shm_segments() - before) == 1
    decode.shutdown()
    assert shm_segments() - before == set()
