"""The scheduler half with hand-built requests: what a prefill engine keeps and advertises,
what a decode engine claims and pulls into which blocks, and when a lease is released."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.v1.request import RequestStatus

from shuffleinfer.kv import metadata as m
from shuffleinfer.kv.scheduler_side import ConnectorScheduler
from tests.kv.conftest import FakeSource, serve

pytestmark = pytest.mark.timeout(30)

BLOCK_SIZE = 128
HOST, PORT = "10.0.0.5", 7001
HOST_ID = "prefill-host/boot-1/42"


def request(params: dict[str, Any] | None, num_prompt_tokens: int,
            num_computed_tokens: int = 0, status: RequestStatus = RequestStatus.WAITING,
            request_id: str = "req-1-abcdefgh") -> Any:
    """A stand-in for vllm.v1.request.Request with the fields the connector reads."""
    return SimpleNamespace(request_id=request_id, kv_transfer_params=params,
                           num_prompt_tokens=num_prompt_tokens,
                           num_computed_tokens=num_computed_tokens, status=status)


@dataclass
class _FakeBlocks:
    unhashed: list[int]

    def get_unhashed_block_ids(self) -> list[int]:
        return list(self.unhashed)


def new_blocks(unhashed: list[int]) -> Any:
    """vLLM's KVCacheBlocks as the connector sees it: the new blocks it may fill."""
    return _FakeBlocks(unhashed)


def prefilled(num_prompt_tokens: int = 300, block_ids: tuple[int, ...] = (4, 9, 2),
              host: str = HOST, port: int = PORT, transfer_id: str = "T1") -> dict[str, Any]:
    """The params a prefill engine hands back for a decode engine."""
    return {m.DO_REMOTE_PREFILL: True, m.TRANSFER_ID: transfer_id, m.REMOTE_HOST: host,
            m.REMOTE_PORT: port, m.REMOTE_HOST_ID: HOST_ID, m.REMOTE_KV_DEVICE: "cpu",
            m.REMOTE_BLOCK_IDS: list(block_ids), m.REMOTE_NUM_TOKENS: num_prompt_tokens}


# --- prefill engine -------------------------------------------------------------------

def test_length_capped_prefill_keeps_its_blocks_and_advertises_them() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T1"}, num_prompt_tokens=300,
                  num_computed_tokens=300, status=RequestStatus.FINISHED_LENGTH_CAPPED)

    keep, params = sched.request_finished(req, [4, 9, 2])

    assert keep is True
    assert params == prefilled(300, (4, 9, 2))
    first = sched.build_connector_meta()
    assert first.new_leases == [m.Lease("T1", "req-1-abcdefgh", (4, 9, 2))]
    assert first.new_loads == []
    assert sched.build_connector_meta().new_leases == []  # handed over exactly once


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED,
                                    RequestStatus.FINISHED_STOPPED,
                                    RequestStatus.FINISHED_ERROR])
def test_prefill_that_ended_otherwise_frees_its_blocks(status: RequestStatus) -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T1"}, 300, 300, status)
    assert sched.request_finished(req, [4, 9, 2]) == (False, None)
    assert sched.build_connector_meta().new_leases == []


@pytest.mark.parametrize("params", [None, {}, {m.TRANSFER_ID: "T1"}])
def test_ordinary_request_is_not_handed_over(params: dict[str, Any] | None) -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request(params, 300, 300, RequestStatus.FINISHED_LENGTH_CAPPED)
    assert sched.request_finished(req, [4, 9, 2]) == (False, None)
    assert sched.build_connector_meta().new_leases == []


# --- decode engine --------------------------------------------------------------------

def test_decode_claims_the_remote_prompt_but_not_the_last_token() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    # The decode prompt is the prefill's prompt plus its first token.
    assert sched.get_num_new_matched_tokens(request(prefilled(300), 301), 0) == (300, True)
    # Even if the remote side computed every prompt token, one is left to compute locally,
    # or vLLM would have nothing to run to sample the next token.
    assert sched.get_num_new_matched_tokens(request(prefilled(300), 300), 0) == (299, True)


def test_decode_claims_only_what_the_local_prefix_cache_lacks() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request(prefilled(300), 301)
    assert sched.get_num_new_matched_tokens(req, 128) == (172, True)
    assert sched.get_num_new_matched_tokens(req, 384) == (0, False)


def test_request_without_remote_prefill_claims_nothing() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    assert sched.get_num_new_matched_tokens(request(None, 301), 0) == (0, False)
    assert sched.get_num_new_matched_tokens(
        request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T"}, 301), 0) == (0, False)


def test_planned_load_maps_remote_blocks_onto_the_new_local_blocks() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request(prefilled(300, (4, 9, 2)), 301, request_id="dec-1")
    num_tokens, is_async = sched.get_num_new_matched_tokens(req, 0)
    assert is_async  # vLLM parks the request in WAITING_FOR_REMOTE_KVS meanwhile
    sched.update_state_after_alloc(req, new_blocks([21, 22, 23]), num_tokens)

    loads = sched.build_connector_meta().new_loads
    assert loads == [m.PlannedLoad("T1", "dec-1", HOST, PORT, (4, 9, 2), (21, 22, 23),
                                   remote_host_id=HOST_ID, remote_kv_device="cpu",
                                   num_tokens=300)]
    assert sched.build_connector_meta().new_loads == []


def test_local_prefix_hit_skips_the_remote_blocks_it_already_has() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request(prefilled(300, (4, 9, 2)), 301, request_id="dec-2")
    num_tokens, _ = sched.get_num_new_matched_tokens(req, BLOCK_SIZE)
    # Local block 30 holds the hit (hashed); 31, 32 are fresh.
    sched.update_state_after_alloc(req, new_blocks([31, 32]), num_tokens)

    (load,) = sched.build_connector_meta().new_loads
    assert load.remote_block_ids == (9, 2)
    assert load.local_block_ids == (31, 32)


def test_block_aligned_prompt_loads_whole_blocks_only() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    # 256 prompt tokens fill exactly two blocks; the first token goes into a third block
    # that the decode engine computes itself.
    req = request(prefilled(256, (4, 9)), 257, request_id="dec-3")
    num_tokens, _ = sched.get_num_new_matched_tokens(req, 0)
    assert num_tokens == 256
    sched.update_state_after_alloc(req, new_blocks([40, 41, 42]), num_tokens)
    (load,) = sched.build_connector_meta().new_loads
    assert load.remote_block_ids == (4, 9)
    assert load.local_block_ids == (40, 41)


def test_load_is_planned_once_per_request() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request(prefilled(300), 301, request_id="dec-4")
    num_tokens, _ = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, new_blocks([21, 22, 23]), num_tokens)
    assert len(sched.build_connector_meta().new_loads) == 1

    # After the load vLLM asks again and calls update_state_after_alloc with 0 tokens.
    assert sched.get_num_new_matched_tokens(req, 300) == (0, False)
    sched.update_state_after_alloc(req, new_blocks([24]), 0)
    sched.update_state_after_alloc(req, new_blocks([24]), num_tokens)
    assert sched.build_connector_meta().new_loads == []
    # A finished decode request that was loaded has nothing to hand over or release.
    req.status = RequestStatus.FINISHED_STOPPED
    assert sched.request_finished(req, [21, 22, 23, 24]) == (False, None)


# --- releasing leases a decode engine will never pull ---------------------------------

class _ReleaseRecorder(FakeSource):
    def __init__(self) -> None:
        super().__init__({}, refuse="not expected in these tests")
        self.event = threading.Event()

    def on_release(self, transfer_id: str) -> None:
        super().on_release(transfer_id)
        self.event.set()


@contextmanager
def prefill_kv_server(auth_token: str | None = None
                      ) -> Iterator[tuple[_ReleaseRecorder, str, int]]:
    recorder = _ReleaseRecorder()
    with serve(recorder, auth_token=auth_token) as (host, port):
        yield recorder, host, port


def _join_release_threads() -> None:
    for thread in threading.enumerate():
        if thread.name == "shuffleinfer-kv-release":
            thread.join(5)


def test_local_prefix_covering_everything_releases_the_remote_lease() -> None:
    with prefill_kv_server() as (recorder, host, port):
        sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
        req = request(prefilled(256, (4, 9), host, port, "T-local"), 257)
        assert sched.get_num_new_matched_tokens(req, 256) == (0, False)
        sched.update_state_after_alloc(req, new_blocks([50]), 0)
        assert recorder.event.wait(5)
    assert recorder.released == ["T-local"]
    assert sched.build_connector_meta().new_loads == []


def test_decode_aborted_before_scheduling_releases_the_lease() -> None:
    with prefill_kv_server() as (recorder, host, port):
        sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
        req = request(prefilled(300, (4, 9, 2), host, port, "T-abort"), 301,
                      status=RequestStatus.FINISHED_ABORTED)
        assert sched.request_finished(req, []) == (False, None)
        assert recorder.event.wait(5)
    assert recorder.released == ["T-abort"]


def test_release_to_an_unreachable_prefill_is_logged_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    # The lease then simply expires on the prefill side; the decode engine goes on.
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request(prefilled(300, (4, 9, 2), "127.0.0.1", 1, "T-gone"), 301,
                  status=RequestStatus.FINISHED_ABORTED)
    with caplog.at_level("WARNING", logger="shuffleinfer.kv.scheduler_side"):
        assert sched.request_finished(req, []) == (False, None)
        _join_release_threads()
    assert "T-gone" in caplog.text and "expire" in caplog.text


@pytest.mark.parametrize(("token", "released"), [("s3cret", True), (None, False)])
def test_release_carries_the_auth_token(
        token: str | None, released: bool, caplog: pytest.LogCaptureFixture) -> None:
    with prefill_kv_server(auth_token="s3cret") as (recorder, host, port):
        sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID, auth_token=token)
        req = request(prefilled(300, (4, 9, 2), host, port, "T-auth"), 301,
                      status=RequestStatus.FINISHED_ABORTED)
        with caplog.at_level("WARNING"):
            sched.request_finished(req, [])
            _join_release_threads()
    assert recorder.released == (["T-auth"] if released else [])
    assert len(recorder.unauthorized) == (0 if released else 1)
    if not released:
        assert "unauthorized" in caplog.text


def test_prefill_advertises_its_host_and_kv_device() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, kv_device="cuda", host_id="gpu-box/b/7")
    req = request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T1"}, 300, 300,
                  RequestStatus.FINISHED_LENGTH_CAPPED)
    _, params = sched.request_finished(req, [4])
    assert params is not None
    assert params[m.REMOTE_HOST_ID] == "gpu-box/b/7" and params[m.REMOTE_KV_DEVICE] == "cuda"


def test_params_without_host_identity_plan_a_load_from_an_unknown_host() -> None:
    # Params from a prefill that does not advertise where it lives: never "same host".
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    params = prefilled(300, (4, 9, 2))
    del params[m.REMOTE_HOST_ID], params[m.REMOTE_KV_DEVICE]
    req = request(params, 301, request_id="dec-old")
    num_tokens, _ = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, new_blocks([21, 22, 23]), num_tokens)
    (load,) = sched.build_connector_meta().new_loads
    assert load.remote_host_id is None and load.remote_kv_device == "cpu"


# --- prefill engine, overlap mode -------------------------------------------------------

def scheduled(new: list[tuple[str, list[int], int]] = (),  # type: ignore[assignment]
              cached: list[tuple[str, list[int] | None, int]] = (),  # type: ignore[assignment]
              num_tokens: dict[str, int] | None = None, resumed: set[str] = frozenset()
              ) -> Any:
    """A stand-in for vLLM's SchedulerOutput: (req id, new block ids, computed tokens) of
    first-time and already-running requests, and the tokens each is scheduled."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c)
                            for r, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _, _ in cached], resumed_req_ids=set(resumed),
            new_block_ids=[None if b is None else (b,) for _, b, _ in cached],
            num_computed_tokens=[c for _, _, c in cached]),
        num_scheduled_tokens=num_tokens or {})


def test_overlap_stages_each_block_in_the_step_that_completes_it() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID, overlap=True)
    req = request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T"}, num_prompt_tokens=600)
    req.num_preemptions = 0
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    rid = req.request_id
    # Chunk 1 (256 tokens) completes blocks 0 and 1; chunk 2 (256) blocks 2 and 3; the
    # last 88 tokens leave block 4 partial: it is staged with the lease.
    meta = sched.build_connector_meta(scheduled(new=[(rid, [7, 3, 8], 0)],
                                                num_tokens={rid: 256}))
    assert meta.stage == [m.StageBlocks("T", 5, 0, (7, 3))]
    meta = sched.build_connector_meta(scheduled(cached=[(rid, [1, 6], 256)],
                                                num_tokens={rid: 256}))
    assert meta.stage == [m.StageBlocks("T", 5, 2, (8, 1))]
    meta = sched.build_connector_meta(scheduled(cached=[(rid, [], 512)],
                                                num_tokens={rid: 88}))
    assert meta.stage == [] and meta.fences == [] and meta.dropped == []


def test_overlap_fences_a_preempted_prefill_and_restages_only_what_is_new() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID, overlap=True)
    req = request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T"}, num_prompt_tokens=600)
    req.num_preemptions = 0
    sched.get_num_new_matched_tokens(req, 0)
    rid = req.request_id
    sched.build_connector_meta(scheduled(new=[(rid, [7, 3], 0)], num_tokens={rid: 256}))
    req.num_preemptions = 1  # the scheduler freed its blocks
    meta = sched.build_connector_meta(scheduled())
    assert meta.fences == ["T"] and meta.stage == []
    # Resumed into other blocks and recomputed: blocks 0 and 1 are staged already.
    meta = sched.build_connector_meta(scheduled(cached=[(rid, [2, 5, 9], 0)],
                                                num_tokens={rid: 384}, resumed={rid}))
    assert meta.stage == [m.StageBlocks("T", 5, 2, (9,))]


@pytest.mark.parametrize(("status", "dropped"), [
    (RequestStatus.FINISHED_ABORTED, ["T"]),
    (RequestStatus.FINISHED_LENGTH_CAPPED, []),  # leased: the lease stages the rest
])
def test_overlap_drops_the_staging_of_a_prefill_that_ends_without_a_lease(
        status: RequestStatus, dropped: list[str]) -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID, overlap=True)
    req = request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T"}, num_prompt_tokens=300)
    req.num_preemptions = 0
    sched.get_num_new_matched_tokens(req, 0)
    sched.build_connector_meta(scheduled(new=[(req.request_id, [7, 3, 1], 0)],
                                         num_tokens={req.request_id: 256}))
    req.status, req.num_computed_tokens = status, 300
    leased, _ = sched.request_finished(req, [7, 3, 1])
    assert leased == (status == RequestStatus.FINISHED_LENGTH_CAPPED)
    meta = sched.build_connector_meta(scheduled())
    assert meta.dropped == dropped
    assert [lease.transfer_id for lease in meta.new_leases] == (["T"] if leased else [])


def test_whole_mode_plans_no_staging() -> None:
    sched = ConnectorScheduler(HOST, PORT, BLOCK_SIZE, host_id=HOST_ID)
    req = request({m.DO_REMOTE_DECODE: True, m.TRANSFER_ID: "T"}, num_prompt_tokens=600)
    req.num_preemptions = 0
    sched.get_num_new_matched_tokens(req, 0)
    meta = sched.build_connector_meta(scheduled(new=[(req.request_id, [7, 3], 0)],
                                                num_tokens={req.request_id: 256}))
    assert meta.stage == []
