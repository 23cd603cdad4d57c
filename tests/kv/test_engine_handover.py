"""The KV hand-over between real vLLM engines (in this process, no Ray, no HTTP): greedy
output equals the colocated engine's through each CPU transport in both modes; a lease
that nobody pulls expires and gives the prefill engine its KV back, as do 200 aborted
prefills; a request aborted while it waits its turn never reaches the engine (a decode's
lease is released at once); a prefill engine that dies during the hand-over costs the
request a recompute, not its answer.

Engines run eager (no torch.compile: a minute less per engine on 2 cores), one core each:
two prefill engines (whole, overlap) and two decode engines (pulling by tcp, by shm). No
prefix caching: each combination sends the same prompts, and a decode engine that had
them cached would pull only what it lacks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import psutil
import pytest

from benchmarks.kv_overhead import start_engine
from shuffleinfer.kv.shm_segments import SEGMENT_PREFIX, SHM_DIR
from shuffleinfer.kv.staging import IDLE_SEGMENTS
from shuffleinfer.protocol import (
    GenerateRequest,
    PrefillResult,
    SamplingOptions,
    TokenDelta,
)
from tests.integration.conftest import model_path, real_chat_prompts, tokenizer

__all__ = ["model_path", "tokenizer"]  # the session's model and tokenizer fixtures

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

CHUNK = 128
MAX_MODEL_LEN = 1024
LEASE_S = 6.0
MAX_TOKENS = 16
BUCKETS = [(150, 260), (260, 400), (400, 600), (600, 900)]
T = TypeVar("T")


class Loop:
    """One event loop on a thread of its own: the engines live in it for the module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engines(loop: Loop, model_path: str) -> Iterator[dict[str, Any]]:
    """prefill/whole and prefill/overlap on core 0, decode/tcp and decode/shm on core 1."""
    specs = {"prefill/whole": ("prefill", 0, False, "auto"),
             "prefill/overlap": ("prefill", 0, True, "auto"),
             "decode/tcp": ("decode", 1, False, "tcp"),
             "decode/shm": ("decode", 1, False, "shm")}
    started: dict[str, Any] = {}
    try:
        for name, (role, core, overlap, transport) in specs.items():
            started[name] = loop.run(start_engine(
                model_path, role, core, max_model_len=MAX_MODEL_LEN, chunk_size=CHUNK,
                overlap=overlap, transport=transport, lease_s=LEASE_S, kv_cache_gib=1,
                engine_args={"enforce_eager": True, "enable_prefix_caching": False}))
        yield started
    finally:
        async def shutdown() -> None:  # in the engines' loop: their tasks live there
            for engine in started.values():
                engine.shutdown()

        loop.run(shutdown())


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:  # noqa: ANN001
    return real_chat_prompts(tokenizer, BUCKETS)


def greedy(req_id: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> GenerateRequest:
    return GenerateRequest(req_id, tuple(prompt),
                           SamplingOptions(max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True))


async def colocated(engine: Any, req: GenerateRequest) -> list[int]:
    return [t async for d in engine.generate(req) for t in d.token_ids]


async def disaggregated(prefill: Any, decode: Any, req: GenerateRequest) -> list[int]:
    result = await prefill.prefill(req)
    assert result.kv_transfer_params is not None, "the prefill leased nothing"
    return list(result.first.token_ids) + [
        t async for d in decode.decode(req, result) for t in d.token_ids]


@pytest.fixture(scope="module")
def reference(loop: Loop, engines: dict[str, Any], prompts: list[list[int]]
              ) -> list[list[int]]:
    """Greedy outputs of one engine running both legs (no hand-over)."""
    return [loop.run(colocated(engines["decode/shm"], greedy(f"ref-{i}", p)))
            for i, p in enumerate(prompts)]


def settled(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 10) -> T:
    """`read()` once `done` holds of it (counters arrive with the engine's next steps)."""
    deadline = time.monotonic() + timeout_s
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def free_kv_tokens(loop: Loop, engine: Any, probe: str) -> int:
    """The engine's free KV after a short greedy request made it step (an idle engine's
    last report can predate what freed its blocks)."""
    loop.run(colocated(engine, greedy(probe, [1, 2, 3, 4, 5], max_tokens=2)))
    return int(engine.load().num_free_kv_tokens)


@pytest.mark.parametrize("mode", ["whole", "overlap"])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_greedy_output_through_each_transport_and_mode_equals_colocated(
        loop: Loop, engines: dict[str, Any], prompts: list[list[int]],
        reference: list[list[int]], mode: str, transport: str) -> None:
    assert sum(len(p) > CHUNK for p in prompts) == len(prompts), "every prompt spans chunks"
    prefill, decode = engines[f"prefill/{mode}"], engines[f"decode/{transport}"]
    before = decode.kv_stats().transports.get(transport)
    overlapped_before = prefill.kv_stats().num_overlapped_blocks
    got = [loop.run(disaggregated(prefill, decode, greedy(f"{mode}-{transport}-{i}", p)))
           for i, p in enumerate(prompts)]
    assert got == reference
    expected = (before.num_transfers if before else 0) + len(prompts)
    after = settled(lambda: decode.kv_stats().transports[transport],
                    lambda t: t.num_transfers >= expected)
    assert after.num_transfers == expected
    assert after.num_failures == (before.num_failures if before else 0)
    early = sum(len(p) // CHUNK for p in prompts) - len(prompts)  # all but the last chunk's
    overlapped = settled(lambda: prefill.kv_stats().num_overlapped_blocks,
                         lambda n: n - overlapped_before >= early) - overlapped_before
    if mode == "overlap":
        assert overlapped >= early
    else:
        assert overlapped == 0


def test_an_unpulled_lease_expires_and_the_prefill_gets_its_kv_back(
        loop: Loop, engines: dict[str, Any], prompts: list[list[int]]) -> None:
    prefill = engines["prefill/overlap"]
    start = free_kv_tokens(loop, prefill, "probe-lease-0")
    expired = prefill.kv_stats().num_expired_leases
    result = loop.run(prefill.prefill(greedy("leased-alone", prompts[-1])))
    assert result.kv_transfer_params is not None
    assert free_kv_tokens(loop, prefill, "probe-lease-1") < start  # held for the decode
    time.sleep(LEASE_S + 1)
    assert free_kv_tokens(loop, prefill, "probe-lease-2") == start
    assert settled(lambda: prefill.kv_stats().num_expired_leases,
                   lambda n: n > expired) == expired + 1


def _staging_segments(engine: Any) -> set[str]:
    """The overlap-mode staging segments of the engine's worker (named by its pid)."""
    pid = _kv_server_pid(engine)
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"{SEGMENT_PREFIX}{pid}-")}


def _kv_server_pid(engine: Any) -> int:
    port = engine.spec.kv_port
    return next(c.pid for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port)


def test_two_hundred_aborted_prefills_leave_the_kv_and_staging_as_they_were(
        loop: Loop, engines: dict[str, Any], prompts: list[list[int]]) -> None:
    prefill = engines["prefill/overlap"]
    start = free_kv_tokens(loop, prefill, "probe-abort-0")

    async def abort_after(i: int, delay_s: float) -> None:
        req = greedy(f"aborted-{i}", prompts[i % len(prompts)] + [i % 97 + 3])
        task = asyncio.ensure_future(prefill.prefill(req))
        await asyncio.sleep(delay_s)
        task.cancel()
        await prefill.abort(req.req_id)
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def storm() -> None:  # queued, mid-prefill, and some just finished (leased)
        await asyncio.gather(*(abort_after(i, (i % 20) * 0.05) for i in range(200)))

    loop.run(storm())
    time.sleep(LEASE_S + 1)  # leases of prefills that finished before their abort expire
    assert free_kv_tokens(loop, prefill, "probe-abort-1") == start
    assert len(_staging_segments(prefill)) <= IDLE_SEGMENTS


def test_requests_aborted_before_their_turn_never_reach_the_engine(
        loop: Loop, engines: dict[str, Any], prompts: list[list[int]]) -> None:
    prefill, decode = engines["prefill/whole"], engines["decode/tcp"]

    async def run() -> tuple[list[bool], list[PrefillResult], PrefillResult, list[TokenDelta]]:
        # The first prompt (over a chunk) fills the engine; the others wait in the queue.
        reqs = [greedy(f"queued-{i}", prompts[-1] + [i + 3], max_tokens=1) for i in range(6)]
        tasks = [asyncio.ensure_future(prefill.prefill(r)) for r in reqs]
        while prefill.load().num_running_reqs < len(reqs):
            await asyncio.sleep(0.01)
        stopped = [await prefill.abort(r.req_id) for r in reqs[1:]]
        results = await asyncio.gather(*tasks)
        # An abort that overtakes its call (Ray does not order an async actor's calls).
        assert not await prefill.abort("overtaken") and not await decode.abort("overtaken")
        late = await prefill.prefill(greedy("overtaken", prompts[0]))
        deltas = [d async for d in decode.decode(greedy("overtaken", prompts[0]), results[0])]
        return stopped, results, late, deltas

    stopped, results, late, deltas = loop.run(run())
    assert stopped == [True] * 5
    assert len(results[0].first.token_ids) == 1 and results[0].first.finish_reason == "length"
    for aborted in [*results[1:], late]:
        assert (aborted.first.token_ids, aborted.first.finish_reason) == ((), "abort")
        assert aborted.kv_transfer_params is None  # nothing leased, nothing to release
    assert [(d.token_ids, d.finish_reason) for d in deltas] == [((), "abort")]
    assert prefill.load().num_running_reqs == decode.load().num_running_reqs == 0


def test_a_decode_stopped_before_its_engine_releases_the_lease_at_once(
        loop: Loop, engines: dict[str, Any], prompts: list[list[int]]) -> None:
    prefill, decode = engines["prefill/whole"], engines["decode/tcp"]
    start = free_kv_tokens(loop, prefill, "probe-stopped-0")
    expired = prefill.kv_stats().num_expired_leases
    req = greedy("stopped-decode", prompts[-1])

    async def run() -> list[TokenDelta]:
        result = await prefill.prefill(req)
        assert result.kv_transfer_params is not None
        assert not await decode.abort(req.req_id)  # it overtakes the decode call
        return [d async for d in decode.decode(req, result)]

    assert [(d.token_ids, d.finish_reason) for d in loop.run(run())] == [((), "abort")]
    probes = iter(range(1, 100))
    assert settled(lambda: free_kv_tokens(loop, prefill, f"probe-stopped-{next(probes)}"),
                   lambda n: n == start) == start
    time.sleep(LEASE_S + 1)  # released, so it does not expire as well
    assert prefill.kv_stats().num_expired_leases == expired


def test_a_prefill_engine_killed_during_the_hand_over_costs_a_recompute_not_the_answer(
        loop: Loop, engines: dict[str, Any], prompts: list[list[int]],
        reference: list[list[int]]) -> None:
    prefill, decode = engines["prefill/whole"], engines["decode/shm"]  # killed: goes last
    req = greedy("orphaned", prompts[-1])
    result = loop.run(prefill.prefill(req))
    assert result.kv_transfer_params is not None
    os.kill(_kv_server_pid(prefill), signal.SIGKILL)  # the worker holding the leased KV
    recomputed = decode.kv_stats().num_recomputed_tokens
    started = time.monotonic()

    async def finish() -> list[int]:
        return list(result.first.token_ids) + [
            t async for d in decode.decode(req, result) for t in d.token_ids]

    got = loop.run(finish())
    took = time.monotonic() - started
    assert got == reference[-1]
    assert took <= 10, f"the decode took {took:.1f} s after the prefill died"
    assert settled(lambda: decode.kv_stats().num_recomputed_tokens,
                   lambda n: n > recomputed) > recomputed
