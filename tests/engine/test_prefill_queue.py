"""A prefill instance's own queue: the order policy decides which prompt the engine gets
next, and the engine is fed about one chunk ahead of what it runs."""

from __future__ import annotations

import asyncio

import pytest

from shuffleinfer.engine.prefill_queue import AbortedWhileWaiting, PrefillQueue
from shuffleinfer.scheduler.policies.prefill_order import (
    PrefillOrderConfig,
    make_prefill_order_policy,
)


class FakeEngine:
    """Records the order in which prompts reach the engine; a test ends prefills."""

    def __init__(self, queue: PrefillQueue) -> None:
        self.queue = queue
        self.started: list[str] = []
        self.finish: dict[str, asyncio.Event] = {}

    async def prefill(self, req_id: str, num_tokens: int) -> None:
        self.finish[req_id] = asyncio.Event()
        async with self.queue.admitted(req_id, num_tokens):
            self.started.append(req_id)
            await self.finish[req_id].wait()


def make_queue(policy: str, chunk_size: int = 100, window: int = 16) -> PrefillQueue:
    order = make_prefill_order_policy(policy, PrefillOrderConfig(sched_window=window))
    return PrefillQueue(order, chunk_size)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def submit(engine: FakeEngine, prompts: dict[str, int]) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(engine.prefill(r, n)) for r, n in prompts.items()]
    await settle()
    return tasks


@pytest.mark.parametrize(("policy", "expected"), [
    ("fcfs", ["big", "a60", "b10", "c30", "d80"]),
    ("sjf", ["big", "b10", "c30", "a60", "d80"]),
    ("ljf", ["big", "d80", "a60", "c30", "b10"]),
])
async def test_the_order_policy_decides_what_the_engine_gets_next(
        policy: str, expected: list[str]) -> None:
    queue = make_queue(policy)
    engine = FakeEngine(queue)
    # "big" fills the engine (more than a chunk), so the others wait here and get sorted.
    tasks = await submit(engine, {"big": 250})
    tasks += await submit(engine, {"a60": 60, "b10": 10, "c30": 30, "d80": 80})
    assert engine.started == ["big"]
    for _ in range(8):  # engine steps: each runs one chunk of what it holds
        queue.on_step()
        await settle()
    engine.finish["big"].set()
    for req in expected[1:]:
        await settle()
        queue.on_step()
        await settle()
        engine.finish.get(req, asyncio.Event()).set()
    await asyncio.gather(*tasks)
    assert engine.started == expected


async def test_the_engine_holds_about_one_chunk_of_unrun_prompt_work() -> None:
    queue = make_queue("fcfs", chunk_size=100)
    engine = FakeEngine(queue)
    tasks = await submit(engine, {f"r{i}": 40 for i in range(10)})
    # 40 + 40 < 100, then 120 >= 100: three prompts are in the engine, seven wait.
    assert engine.started == ["r0", "r1", "r2"]
    assert queue.num_waiting == 7
    assert queue.num_queued_tokens == 400
    queue.on_step()  # the engine ran a chunk: 20 tokens of unrun work left
    await settle()
    assert engine.started == ["r0", "r1", "r2", "r3", "r4"]  # 20 + 40 + 40 >= 100
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert queue.num_queued_tokens == 0 and queue.num_waiting == 0


async def test_a_long_prompt_is_followed_in_its_last_chunk() -> None:
    queue = make_queue("fcfs", chunk_size=100)
    engine = FakeEngine(queue)
    tasks = await submit(engine, {"long": 230, "next": 50})
    assert engine.started == ["long"]
    queue.on_step()
    await settle()
    assert engine.started == ["long"]  # 130 tokens unrun: the next chunk is full
    queue.on_step()
    await settle()
    assert engine.started == ["long", "next"]  # 30 left: "next" shares the last chunk
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_prompt_cancelled_while_queued_leaves_no_trace() -> None:
    queue = make_queue("sjf", chunk_size=100)
    engine = FakeEngine(queue)
    tasks = await submit(engine, {"big": 500, "small": 10, "other": 20})
    tasks[1].cancel()
    await settle()
    assert queue.num_waiting == 1
    engine.finish["big"].set()
    await settle()
    assert engine.started == ["big", "other"]
    engine.finish["other"].set()
    await asyncio.gather(tasks[0], tasks[2])
    assert queue.num_queued_tokens == 0 and queue.unrun_tokens == 0


async def test_a_prompt_aborted_while_queued_never_reaches_the_engine() -> None:
    queue = make_queue("fcfs", chunk_size=100)
    engine = FakeEngine(queue)
    tasks = await submit(engine, {"big": 500, "gone": 10, "next": 20})
    assert queue.abort("gone") is True
    assert queue.abort("big") is False  # in the engine: the engine aborts it, not the queue
    assert queue.abort("gone") is False and queue.abort("unknown") is False
    await settle()
    with pytest.raises(AbortedWhileWaiting):
        await tasks[1]
    assert queue.num_waiting == 1 and queue.num_queued_tokens == 520
    engine.finish["big"].set()
    await settle()
    assert engine.started == ["big", "next"]
    engine.finish["next"].set()
    await asyncio.gather(tasks[0], tasks[2])
    assert queue.num_queued_tokens == 0 and queue.unrun_tokens == 0


async def test_the_same_request_cannot_queue_twice() -> None:
    queue = make_queue("fcfs")
    engine = FakeEngine(queue)
    tasks = await submit(engine, {"r": 10})
    with pytest.raises(ValueError, match="already in the prefill queue"):
        async with queue.admitted("r", 10):
            pass
    engine.finish["r"].set()
    await asyncio.gather(*tasks)


async def test_queueing_delay_is_reported() -> None:
    now = [0.0]
    order = make_prefill_order_policy("fcfs")
    queue = PrefillQueue(order, 100, clock=lambda: now[0])
    engine = FakeEngine(queue)
    tasks = await submit(engine, {"a": 200, "b": 10})
    now[0] = 3.0
    assert queue.oldest_wait_s() == 3.0
    engine.finish["a"].set()
    await settle()
    assert queue.recent_delay_s == pytest.approx(1.5)  # a waited 0 s, b 3 s
    engine.finish["b"].set()
    await asyncio.gather(*tasks)
