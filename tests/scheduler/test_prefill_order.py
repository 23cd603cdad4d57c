"""Prefill order: every policy runs the same scenario table (queue in, run order out, in
windows of 4 to keep the tables short); then the starvation bound on a live queue, and
how chunks are filled."""

from __future__ import annotations

import random

import pytest

from shuffleinfer.scheduler.policies.prefill_order import (
    PREFILL_ORDER_POLICIES,
    ChunkSlice,
    PrefillOrderConfig,
    QueuedPrompt,
    fill_chunk,
    make_prefill_order_policy,
)

WINDOW = PrefillOrderConfig(sched_window=4)


def queue(*prompts: tuple[str, int, int] | tuple[str, int, int, int]) -> list[QueuedPrompt]:
    """(req_id, arrival_seq, num_prompt_tokens[, num_computed_tokens])."""
    return [QueuedPrompt(*p) for p in prompts]


SCENARIOS: dict[str, list[QueuedPrompt]] = {
    "mixed lengths in one window": queue(("a", 0, 300), ("b", 1, 50), ("c", 2, 700),
                                         ("d", 3, 50)),
    "windows run in arrival order": queue(("a", 0, 900), ("b", 1, 800), ("c", 2, 700),
                                          ("d", 3, 600), ("e", 4, 10), ("f", 5, 20)),
    "a partly drained window still runs first": queue(
        ("c", 2, 500), ("d", 3, 400), ("e", 4, 10), ("f", 5, 5), ("g", 6, 800)),
    "a sliced prompt continues first": queue(("a", 0, 1000, 512), ("b", 1, 10),
                                             ("c", 2, 2000)),
    "equal lengths keep arrival order": queue(("a", 0, 100), ("b", 1, 100), ("c", 2, 100)),
    "a queue handed over in any order": queue(("d", 3, 40), ("b", 1, 20), ("a", 0, 10),
                                              ("c", 2, 30)),
}

EXPECTED: dict[str, dict[str, str]] = {
    "fcfs": {
        "mixed lengths in one window": "abcd",
        "windows run in arrival order": "abcdef",
        "a partly drained window still runs first": "cdefg",
        "a sliced prompt continues first": "abc",
        "equal lengths keep arrival order": "abc",
        "a queue handed over in any order": "abcd",
    },
    "sjf": {
        "mixed lengths in one window": "bdac",
        "windows run in arrival order": "dcbaef",
        "a partly drained window still runs first": "dcfeg",
        "a sliced prompt continues first": "abc",
        "equal lengths keep arrival order": "abc",
        "a queue handed over in any order": "abcd",
    },
    "ljf": {
        "mixed lengths in one window": "cabd",
        "windows run in arrival order": "abcdfe",
        "a partly drained window still runs first": "cdgef",
        "a sliced prompt continues first": "acb",
        "equal lengths keep arrival order": "abc",
        "a queue handed over in any order": "dcba",
    },
}


def test_every_registered_policy_has_expectations() -> None:
    assert set(EXPECTED) == set(PREFILL_ORDER_POLICIES)
    for policy, table in EXPECTED.items():
        assert set(table) == set(SCENARIOS), policy


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("policy", sorted(PREFILL_ORDER_POLICIES))
def test_scenario_table(policy: str, scenario: str) -> None:
    order = make_prefill_order_policy(policy, WINDOW).order(SCENARIOS[scenario])
    assert "".join(p.req_id for p in order) == EXPECTED[policy][scenario]


def overtakes(policy: str, sched_window: int, seed: int = 0) -> list[int]:
    """Run a live queue chunk by chunk (512 tokens) while prompts keep arriving faster than
    they can be served; for each prompt, how many later arrivals started before it."""
    rng = random.Random(seed)
    chooser = make_prefill_order_policy(policy, PrefillOrderConfig(sched_window=sched_window))
    waiting: dict[str, QueuedPrompt] = {}
    started_at: dict[int, int] = {}
    for step in range(400):
        seq = len(started_at) + len(waiting)
        if seq < 600:  # two arrivals per chunk for 300 chunks, then the queue drains
            for s in (seq, seq + 1):
                length = rng.choice([8, 16, 32, 64, 1500])
                waiting[str(s)] = QueuedPrompt(str(s), s, length)
        for piece in fill_chunk(chooser.order(list(waiting.values())), 512):
            p = waiting.pop(piece.req_id)
            if p.num_computed_tokens == 0:
                started_at[p.arrival_seq] = step
            if piece.num_tokens < p.num_remaining_tokens:
                waiting[p.req_id] = QueuedPrompt(p.req_id, p.arrival_seq, p.num_prompt_tokens,
                                                 p.num_computed_tokens + piece.num_tokens)
    assert not waiting
    return [sum(1 for later, at in started_at.items() if later > seq and at < started)
            for seq, started in started_at.items()]


@pytest.mark.parametrize("policy", sorted(PREFILL_ORDER_POLICIES))
def test_no_prompt_is_overtaken_by_more_than_a_window(policy: str) -> None:
    worst = max(overtakes(policy, sched_window=16))
    assert worst <= 15
    if policy == "fcfs":
        assert worst == 0


def test_without_windows_sjf_starves_long_prompts() -> None:
    # Every short prompt that arrives while a long one waits jumps ahead of it (measured
    # 102 overtakes at worst, against 13 with windows of 16).
    assert max(overtakes("sjf", sched_window=10**9)) > 5 * max(overtakes("sjf", 16))


def test_default_window_is_the_papers() -> None:
    assert make_prefill_order_policy("sjf").config.sched_window == 16


def test_chunk_packs_short_prompts_and_slices_the_one_that_does_not_fit() -> None:
    short = queue(("a", 0, 100), ("b", 1, 200), ("c", 2, 150))
    assert fill_chunk(short, 512) == [ChunkSlice("a", 100), ChunkSlice("b", 200),
                                      ChunkSlice("c", 150)]
    assert fill_chunk(queue(("a", 0, 100), ("b", 1, 1000)), 512) == [
        ChunkSlice("a", 100), ChunkSlice("b", 412)]
    assert fill_chunk(queue(("a", 0, 1000, 412), ("b", 1, 5)), 512) == [
        ChunkSlice("a", 512)]
    assert fill_chunk(queue(("a", 0, 512), ("b", 1, 10)), 512) == [ChunkSlice("a", 512)]
    assert fill_chunk([], 512) == []
    with pytest.raises(ValueError, match="chunk_size"):
        fill_chunk(short, 0)


@pytest.mark.parametrize("policy", sorted(PREFILL_ORDER_POLICIES))
def test_chunks_are_full_until_the_queue_runs_dry(policy: str) -> None:
    chooser = make_prefill_order_policy(policy, WINDOW)
    lengths = [30, 1200, 7, 512, 90, 2000, 64, 300, 1]
    waiting = {str(i): QueuedPrompt(str(i), i, n) for i, n in enumerate(lengths)}
    done: dict[str, int] = {}
    chunks: list[int] = []
    while waiting:
        pieces = fill_chunk(chooser.order(list(waiting.values())), 512)
        chunks.append(sum(p.num_tokens for p in pieces))
        for piece in pieces:
            p = waiting.pop(piece.req_id)
            done[p.req_id] = done.get(p.req_id, 0) + piece.num_tokens
            if done[p.req_id] < p.num_prompt_tokens:
                waiting[p.req_id] = QueuedPrompt(p.req_id, p.arrival_seq, p.num_prompt_tokens,
                                                 done[p.req_id])
    assert done == {str(i): n for i, n in enumerate(lengths)}
    assert chunks[:-1] == [512] * (len(chunks) - 1) and 0 < chunks[-1] <= 512


def test_unknown_order_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'lifo'.*fcfs, ljf, sjf"):
        make_prefill_order_policy("lifo")
