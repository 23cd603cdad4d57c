"""The labelled set shipped for the default model: at least 2,000 prompts with both
lengths, spread over every task of the prompts file, ids and lengths only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from shuffleinfer.predictor.data import read_prompts
from shuffleinfer.predictor.labels import read_labels

REPO = Path(__file__).resolve().parents[2]
LABELS = REPO / "shuffleinfer" / "predictor" / "labels" / "SmolLM2-135M-Instruct.csv"
PROMPTS = REPO.parent / "shared" / "data" / "prompts" / "mixed_tasks.jsonl.gz"


def test_default_model_labels_cover_every_task_with_both_columns() -> None:
    rows = read_labels(LABELS)
    labelled = [r for r in rows if r.output_tokens("greedy") is not None
                and r.output_tokens("sampled") is not None]
    assert len(labelled) >= 2000
    assert len({r.prompt_id for r in labelled}) == len(labelled)  # distinct prompts
    prompts = {r.id: r for r in read_prompts(PROMPTS)}
    assert all(r.id in prompts for r in rows)
    tasks = Counter(r.task for r in labelled)
    assert set(tasks) == {p.task for p in prompts.values()}
    assert min(tasks.values()) >= 200, tasks
    # Lengths only: the file holds no prompt or answer text.
    assert LABELS.stat().st_size < 200 * len(rows)
