"""Where an abort finds a request on an instance: the moments a real engine rarely shows
(an abort landing as its request is let in, or overtaking the call it aborts). The
engine here only records which requests reach it; tests/kv/test_engine_handover.py runs
the common cases on real vLLM engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from shuffleinfer.engine.instance import EngineInstance, InstanceSpec
from shuffleinfer.protocol import GenerateRequest, PrefillResult, SamplingOptions

CHUNK = 100


class RecordingEngine:
    """Takes requests as AsyncLLM does; each makes one token once `release` is set."""

    def __init__(self) -> None:
        self.reached: list[str] = []
        self.aborted: list[str] = []
        self.release = asyncio.Event()

    async def generate(self, prompt: dict[str, Any], params: Any, request_id: str
                       ) -> AsyncIterator[Any]:
        self.reached.append(request_id)
        await self.release.wait()
        done = SimpleNamespace(token_ids=[7], text="x", logprobs=None, finish_reason="length")
        yield SimpleNamespace(outputs=[done], finished=True, kv_transfer_params=None,
                              num_cached_tokens=0)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def instance() -> tuple[EngineInstance, RecordingEngine]:
    inst = EngineInstance(InstanceSpec("prefill-0", "prefill", "unused", chunk_size=CHUNK))
    engine = RecordingEngine()
    inst._engine = engine
    return inst, engine


def request(req_id: str, num_tokens: int, max_tokens: int = 1) -> GenerateRequest:
    return GenerateRequest(req_id, tuple(range(3, 3 + num_tokens)),
                           SamplingOptions(max_tokens=max_tokens, temperature=0.0))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_abort_landing_as_the_prompt_is_let_in_keeps_it_from_the_engine() -> None:
    inst, engine = instance()
    first = asyncio.ensure_future(inst.prefill(request("first", 3 * CHUNK)))
    second = asyncio.ensure_future(inst.prefill(request("second", 10)))
    await settle()
    assert engine.reached == ["first"]  # "second" waits: the engine holds over a chunk
    for _ in range(3):  # the engine's steps run "first"'s chunks: "second" is let in...
        inst._on_step(SimpleNamespace(kv_cache_usage=0.0))
    assert not await inst.abort("second")  # ...and aborted before it could resume
    engine.release.set()
    done: PrefillResult = await first
    gone: PrefillResult = await second
    assert engine.reached == ["first"]
    assert done.first.token_ids == (7,)
    assert (gone.first.token_ids, gone.first.finish_reason) == ((), "abort")
    assert inst.load().num_running_reqs == 0


async def test_an_abort_that_overtakes_its_call_stops_the_call_on_arrival() -> None:
    inst, engine = instance()
    assert not await inst.abort("overtaken")
    gone = await inst.prefill(request("overtaken", 10, max_tokens=4))
    assert not await inst.abort("overtaken")  # (its decode, on another instance)
    decoded = [d async for d in inst.decode(request("overtaken", 10, max_tokens=4), gone)]
    assert (gone.first.finish_reason, gone.kv_transfer_params) == ("abort", None)
    assert [(d.token_ids, d.finish_reason) for d in decoded] == [((), "abort")]
    assert engine.reached == []


async def test_a_prompt_aborted_in_the_queue_reports_it_never_ran() -> None:
    inst, engine = instance()
    first = asyncio.ensure_future(inst.prefill(request("first", 3 * CHUNK)))
    queued = asyncio.ensure_future(inst.prefill(request("queued", 10)))
    await settle()
    assert await inst.abort("queued")  # True: the engine never saw it
    assert not await inst.abort("first")  # in the engine: aborted there
    engine.release.set()
    await asyncio.gather(first, queued)
    assert engine.reached == ["first"] and engine.aborted == ["first"]
    assert (await queued).first.finish_reason == "abort"
