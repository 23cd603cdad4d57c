"""A decode instance's admission gate: decodes reach the engine when the admission policy
says they fit, and never leave the gate stuck."""

from __future__ import annotations

import asyncio

import pytest

from shuffleinfer.engine.decode_gate import DecodeGate, DecodeSlot
from shuffleinfer.engine.prefill_queue import AbortedWhileWaiting
from shuffleinfer.scheduler.policies.admission import make_admission_policy
from shuffleinfer.scheduler.prediction import Prediction


def predicted(tokens: int) -> Prediction:
    return Prediction(lower=tokens, upper=tokens + 50, point=tokens, bucket=tokens // 50)


class FakeDecodes:
    def __init__(self, gate: DecodeGate) -> None:
        self.gate = gate
        self.started: list[str] = []
        self.slots: dict[str, DecodeSlot] = {}
        self.finish: dict[str, asyncio.Event] = {}

    async def decode(self, req_id: str, prompt: int, prediction: Prediction | None) -> None:
        self.finish[req_id] = asyncio.Event()
        async with self.gate.admitted(req_id, prompt, prediction) as slot:
            self.started.append(req_id)
            self.slots[req_id] = slot
            await self.finish[req_id].wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def gate_of(policy: str, capacity_tokens: int) -> DecodeGate:
    gate = DecodeGate(make_admission_policy(policy))
    gate.set_capacity(capacity_tokens // 16, 16)
    return gate


async def run(decodes: FakeDecodes, *reqs: tuple[str, int, Prediction | None]
              ) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(decodes.decode(*r)) for r in reqs]
    await settle()
    return tasks


async def finish(decodes: FakeDecodes, tasks: list[asyncio.Task[None]]) -> None:
    for event in decodes.finish.values():
        event.set()
    await asyncio.gather(*tasks)


async def test_greedy_admits_what_fits_now_and_the_rest_when_kv_frees() -> None:
    decodes = FakeDecodes(gate_of("greedy", 1000))
    tasks = await run(decodes, ("a", 500, predicted(400)), ("b", 400, predicted(400)),
                      ("c", 300, predicted(10)))
    assert decodes.started == ["a", "b"]  # c (300) does not fit in the 96 left
    decodes.finish["a"].set()
    await settle()
    assert decodes.started == ["a", "b", "c"]
    await finish(decodes, tasks)


async def test_reserve_static_keeps_room_for_the_predicted_output() -> None:
    decodes = FakeDecodes(gate_of("reserve_static", 1000))
    tasks = await run(decodes, ("a", 300, predicted(400)), ("b", 100, predicted(700)))
    # a holds 304 tokens of KV; b's predicted 800 does not fit the 696 left, though its
    # prompt would.
    assert decodes.started == ["a"]
    decodes.finish["a"].set()
    await settle()
    assert decodes.started == ["a", "b"]
    await finish(decodes, tasks)


async def test_generated_tokens_count_against_free_kv() -> None:
    gate = gate_of("greedy", 1000)
    decodes = FakeDecodes(gate)
    tasks = await run(decodes, ("a", 100, None))
    assert gate.capacity_tokens == 992  # 62 blocks of 16
    assert gate.free_kv_tokens() == 992 - 112  # whole blocks
    decodes.slots["a"].num_generated = 400
    assert gate.free_kv_tokens() == 992 - 512
    gate.on_step(0.9)  # the engine's own view is more cautious
    assert gate.free_kv_tokens() == 99
    await finish(decodes, tasks)


async def test_an_idle_engine_always_takes_its_first_decode() -> None:
    decodes = FakeDecodes(gate_of("reserve_static", 1000))
    tasks = await run(decodes, ("huge", 900, predicted(5000)))
    assert decodes.started == ["huge"]
    await finish(decodes, tasks)


async def test_before_the_engine_reports_its_cache_everything_is_admitted() -> None:
    decodes = FakeDecodes(DecodeGate(make_admission_policy("reserve_dynamic")))
    tasks = await run(decodes, ("a", 10_000, predicted(100)), ("b", 10_000, None))
    assert decodes.started == ["a", "b"]
    await finish(decodes, tasks)


async def test_a_decode_cancelled_while_waiting_frees_its_place() -> None:
    gate = gate_of("greedy", 1000)
    decodes = FakeDecodes(gate)
    tasks = await run(decodes, ("a", 900, None), ("b", 500, None), ("c", 50, None))
    assert decodes.started == ["a"]  # b does not fit, and c may not overtake it
    tasks[1].cancel()
    await settle()
    assert decodes.started == ["a", "c"]
    await finish(decodes, [tasks[0], tasks[2]])
    assert gate.num_waiting == 0 and not gate.running


async def test_a_decode_aborted_while_waiting_leaves_and_lets_the_next_in() -> None:
    gate = gate_of("greedy", 1000)
    decodes = FakeDecodes(gate)
    tasks = await run(decodes, ("a", 900, None), ("b", 500, None), ("c", 50, None))
    assert gate.abort("b") is True
    assert gate.abort("a") is False  # running: the engine aborts it, not the gate
    await settle()
    with pytest.raises(AbortedWhileWaiting):
        await tasks[1]
    assert decodes.started == ["a", "c"]
    await finish(decodes, [tasks[0], tasks[2]])
    assert gate.num_waiting == 0 and not gate.running


async def test_the_same_request_cannot_wait_twice() -> None:
    gate = gate_of("greedy", 1000)
    decodes = FakeDecodes(gate)
    tasks = await run(decodes, ("a", 10, None))
    with pytest.raises(ValueError, match="already waiting or decoding"):
        async with gate.admitted("a", 10, None):
            pass
    await finish(decodes, tasks)
