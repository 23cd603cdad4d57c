"""Choosing prompts: distinct prompts, an equal share per task, deterministic, and a smaller
limit picks a subset of a larger one (so a labelling run can grow)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from shuffleinfer.predictor.data import PromptRecord, read_prompts, select_prompts


def records(per_task: dict[str, int]) -> list[PromptRecord]:
    return [PromptRecord(id=f"{task}:{i}", prompt_id=f"p-{task}-{i}", task=task,
                         messages=({"role": "user", "content": f"{task} {i}"},))
            for task, n in per_task.items() for i in range(n)]


def test_limit_spreads_over_tasks_equally_and_is_deterministic() -> None:
    data = records({"chat": 50, "qa": 50, "math": 50, "coding": 50, "summarization": 50,
                    "creative_writing": 50})
    chosen = select_prompts(data, 30, seed=1)
    assert Counter(r.task for r in chosen) == {t: 5 for t in Counter(r.task for r in data)}
    assert [r.id for r in select_prompts(data, 30, seed=1)] == [r.id for r in chosen]
    assert [r.id for r in select_prompts(data, 30, seed=2)] != [r.id for r in chosen]
    assert len({r.task for r in chosen[:10]}) >= 3  # interleaved, not grouped by task


def test_a_small_task_gives_its_share_to_the_others() -> None:
    chosen = select_prompts(records({"chat": 100, "qa": 2, "math": 100}), 30)
    assert Counter(r.task for r in chosen) == {"qa": 2, "chat": 14, "math": 14}


@pytest.mark.parametrize("small, large", [(6, 30), (7, 8), (30, 200)])
def test_a_smaller_limit_picks_a_subset(small: int, large: int) -> None:
    data = records({"chat": 80, "qa": 5, "math": 80})
    smaller, larger = select_prompts(data, small), select_prompts(data, large)
    assert {r.id for r in smaller} <= {r.id for r in larger}


def test_one_record_per_prompt() -> None:
    data = records({"chat": 3})
    duplicate = PromptRecord(id="chat:dup", prompt_id="p-chat-0", task="chat",
                             messages=({"role": "user", "content": "chat 0"},))
    assert len(select_prompts(data + [duplicate], None)) == 3


def test_bad_lines_are_refused_with_their_line_number(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl.gz"
    good = {"id": "a", "prompt_id": "pa", "task": "qa",
            "messages": [{"role": "user", "content": "hi"}]}
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl.gz:2"):
        read_prompts(path)
    with pytest.raises(ValueError, match="limit"):
        select_prompts([], 0)
