"""The label command's bookkeeping with a fake engine: rows appended as prompts finish, a
run resumes after a crash without redoing or losing prompts, long prompts are recorded as
skipped, and nothing starts an engine when everything is labelled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from shuffleinfer.predictor.data import PromptRecord
from shuffleinfer.predictor.label import (
    SKIPPED_TOO_LONG,
    Completion,
    LabelEngine,
    LabelJob,
    label_prompts,
)
from shuffleinfer.predictor.labels import COLUMNS, LabelRow, describe, read_labels


class FakeEngine(LabelEngine):
    """One token per word; greedy length = 2 x words, sampled = 3 x words cut at 20.
    Jobs finish in reverse order within windows of 3 (like continuous batching, later
    prompts may finish first); the engine dies after `die_after` results."""

    def __init__(self, die_after: int | None = None) -> None:
        self.jobs: list[LabelJob] = []
        self.die_after = die_after

    def tokenize(self, record: PromptRecord) -> list[int]:
        return list(range(len(record.messages[-1]["content"].split())))

    def stream(self, jobs: Iterable[LabelJob]) -> Iterator[tuple[int, Completion, Completion]]:
        self.jobs = list(jobs)
        order = [job for i in range(0, len(self.jobs), 3) for job in reversed(self.jobs[i:i + 3])]
        for n, job in enumerate(order):
            if n == self.die_after:
                raise RuntimeError("engine died")
            words = len(job.token_ids)
            yield job.key, Completion(2 * words, "stop"), Completion(min(3 * words, 20),
                                                                       "length")


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"x:{i}", prompt_id=f"p{i}", task="qa",
                         messages=({"role": "user", "content": "word " * (i + 1)},))
            for i in range(n)]


def test_rows_hold_both_samplings_and_skipped_prompts_say_why(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    engine = FakeEngine()
    summary = label_prompts(prompts(5), out, lambda: engine, max_prompt_tokens=4,
                            flush_every=2, progress=False)
    rows = {r.id: r for r in read_labels(out)}
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert sorted(rows) == [f"x:{i}" for i in range(5)]
    assert (rows["x:2"].prompt_tokens, rows["x:2"].greedy_output_tokens,
            rows["x:2"].sampled_output_tokens) == (3, 6, 9)
    assert rows["x:4"].greedy_output_tokens is None
    assert rows["x:4"].greedy_finish_reason == SKIPPED_TOO_LONG
    assert (summary.num_labelled, summary.num_skipped) == (4, 1)
    assert [job.key for job in engine.jobs] == [0, 1, 2, 3]  # the long one never ran


def test_a_crashed_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    with pytest.raises(RuntimeError, match="engine died"):
        label_prompts(prompts(7), out, lambda: FakeEngine(die_after=5), max_prompt_tokens=100,
                      flush_every=2, progress=False)
    assert len(read_labels(out)) == 4  # two flushes of two; the fifth was not flushed
    engine = FakeEngine()
    summary = label_prompts(prompts(7), out, lambda: engine, max_prompt_tokens=100,
                            flush_every=2, progress=False)
    assert len(engine.jobs) == 3
    assert (summary.num_already_labelled, summary.num_labelled) == (4, 3)
    assert sorted(r.id for r in read_labels(out)) == [f"x:{i}" for i in range(7)]


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
    last_id = text.splitlines()[-1].split(",")[0]
    out.write_text(text[: text.rfind(last_id) + 6])  # killed while writing the last row
    assert len(read_labels(out)) == 2
    label_prompts(prompts(3), out, FakeEngine, max_prompt_tokens=100, progress=False)
    rows = read_labels(out)
    assert sorted(r.id for r in rows) == ["x:0", "x:1", "x:2"]
    assert {r.id: r.greedy_output_tokens for r in rows}[last_id] == 2 * (int(last_id[2:]) + 1)


def test_a_foreign_csv_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    out.write_text("id,length\na,3\n")
    with pytest.raises(ValueError, match="header"):
        label_prompts(prompts(1), out, FakeEngine, max_prompt_tokens=100, progress=False)


def test_the_summary_line_gives_the_length_distribution() -> None:
    rows = [LabelRow(f"x:{i}", f"p{i}", "qa", 5, n, "length" if n == 20 else "stop", n,
                     "stop") for i, n in enumerate([5, 10, 20, 20])]
    assert describe(rows, "greedy") == "greedy: 4 labels, median 15, p90 20, 50% cut at max_tokens"
    assert describe([], "sampled") == "sampled: no labels"


def test_a_bad_engine_arg_stops_label_before_any_engine_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shuffleinfer.cli import main

    out = tmp_path / "labels.csv"
    args = ["predictor", "label", "--out", str(out), "--limit", "1"]
    assert main([*args, "--engine-arg", "max_model_len=99"]) == 2
    assert "invalid --engine-arg: label sets max_model_len itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--engine-arg", "enforce_eager"])  # no "="
    assert "--engine-arg" in capsys.readouterr().err
    assert not out.exists()
