"""The label command's bookkeeping with a fake engine: rows appended per batch, a run
resumes after a crash without redoing or losing prompts, long prompts are recorded as
skipped, and both samplings of a prompt go to the engine together."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from shuffleinfer.predictor.data import PromptRecord
from shuffleinfer.predictor.label import (
    SKIPPED_TOO_LONG,
    Completion,
    LabelEngine,
    label_prompts,
)
from shuffleinfer.predictor.labels import COLUMNS, read_labels


class FakeEngine(LabelEngine):
    """Token ids = one per word; greedy length = 2 x words; fails on batch `fail_on`."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[int] = []
        self.fail_on = fail_on

    def tokenize(self, record: PromptRecord) -> list[int]:
        return list(range(len(record.messages[-1]["content"].split())))

    def generate(self, prompts: Sequence[list[int]],
                 seeds: Sequence[int]) -> list[tuple[Completion, Completion]]:
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("engine died")
        self.batches.append(len(prompts))
        return [(Completion(2 * len(p), "stop"), Completion(min(3 * len(p), 20), "length"))
                for p in prompts]


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"x:{i}", prompt_id=f"p{i}", task="qa",
                         messages=({"role": "user", "content": "word " * (i + 1)},))
            for i in range(n)]


def test_rows_hold_both_samplings_and_skipped_prompts_say_why(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    engine = FakeEngine()
    summary = label_prompts(prompts(5), out, lambda: engine, max_prompt_tokens=4,
                            batch_size=2, progress=False)
    rows = read_labels(out)
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [r.id for r in rows] == [f"x:{i}" for i in range(5)]
    assert (rows[2].prompt_tokens, rows[2].greedy_output_tokens,
            rows[2].sampled_output_tokens) == (3, 6, 9)
    assert rows[4].greedy_output_tokens is None
    assert rows[4].greedy_finish_reason == SKIPPED_TOO_LONG
    assert (summary.num_labelled, summary.num_skipped) == (4, 1)
    assert engine.batches == [2, 2]  # the 5-word prompt never reached the engine


def test_a_crashed_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    with pytest.raises(RuntimeError, match="engine died"):
        label_prompts(prompts(7), out, lambda: FakeEngine(fail_on=2), max_prompt_tokens=100,
                      batch_size=3, progress=False)
    assert len(read_labels(out)) == 6  # the two finished batches were kept
    engine = FakeEngine()
    summary = label_prompts(prompts(7), out, lambda: engine, max_prompt_tokens=100,
                            batch_size=3, progress=False)
    assert engine.batches == [1]
    assert (summary.num_already_labelled, summary.num_labelled) == (6, 1)
    assert [r.id for r in read_labels(out)] == [f"x:{i}" for i in range(7)]


def test_nothing_left_to_label_starts_no_engine(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    label_prompts(prompts(3), out, FakeEngine, max_prompt_tokens=100, progress=False)

    def no_engine() -> LabelEngine:
        raise AssertionError("engine started with nothing to do")

    summary = label_prompts(prompts(3), out, no_engine, max_prompt_tokens=100, progress=False)
    assert summary.num_already_labelled == 3


def test_a_torn_last_row_is_dropped_and_relabelled(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    label_prompts(prompts(3), out, FakeEngine, max_prompt_tokens=100, progress=False)
    text = out.read_text()
    out.write_text(text[: text.rfind("x:2") + 6])  # killed while writing the last row
    assert [r.id for r in read_labels(out)] == ["x:0", "x:1"]
    label_prompts(prompts(3), out, FakeEngine, max_prompt_tokens=100, progress=False)
    rows = read_labels(out)
    assert [r.id for r in rows] == ["x:0", "x:1", "x:2"]
    assert rows[2].greedy_output_tokens == 6


def test_a_foreign_csv_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    out.write_text("id,length\na,3\n")
    with pytest.raises(ValueError, match="header"):
        label_prompts(prompts(1), out, FakeEngine, max_prompt_tokens=100, progress=False)
