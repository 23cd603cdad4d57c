"""`shuffleinfer predictor eval` on a small synthetic data set whose lengths follow from
the prompt's words: the table and the JSON line, the learned predictor beating the
baselines held out and prequentially, and clear errors for bad inputs."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from shuffleinfer.cli import main
from shuffleinfer.predictor.labels import LabelRow, append_labels
from tests.predictor.conftest import KINDS, TOPICS

# each task mixes a long and a short kind, so the (oracle) task explains little
TASK_OF = {"write a long story about": "chat", "answer in one word:": "chat",
           "summarise this text in two sentences:": "coding",
           "write a python function that": "coding"}


def write_data(tmp_path: Path, n: int = 700, max_tokens: int = 400) -> tuple[Path, Path]:
    """A prompts file and a labels file of n prompts; stories are cut at max_tokens."""
    rng = random.Random(0)
    data, rows = tmp_path / "prompts.jsonl.gz", []
    with gzip.open(data, "wt") as f:
        for i in range(n):
            instruction, length = rng.choice(list(KINDS.items()))
            text = f"{instruction} {rng.choice(TOPICS)} and {rng.choice(TOPICS)}"
            f.write(json.dumps({"id": f"s:{i}", "prompt_id": f"p{i}", "task": TASK_OF[instruction],
                                "messages": [{"role": "user", "content": text}]}) + "\n")
            greedy = min(max(length + rng.randint(-10, 10), 1), max_tokens)
            sampled = min(max(length + rng.randint(-40, 40), 1), max_tokens)
            rows.append(LabelRow(f"s:{i}", f"p{i}", TASK_OF[instruction], 30 + rng.randint(0, 9),
                                 greedy, "length" if greedy == max_tokens else "stop",
                                 sampled, "length" if sampled == max_tokens else "stop"))
    rows.append(LabelRow("s:skipped", "px", "qa", 5000, None, "skipped_prompt_too_long",
                         None, "skipped_prompt_too_long"))
    labels = tmp_path / "labels.csv"
    append_labels(labels, rows)
    return data, labels


@pytest.mark.parametrize("target", ["greedy", "sampled"])
def test_eval_prints_a_table_and_one_json_line(tmp_path: Path, target: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data, labels = write_data(tmp_path)
    code = main(["predictor", "eval", "--data", str(data), "--labels", str(labels), "--json",
                 "--target", target, "--warmup", "300"])
    out = capsys.readouterr().out
    assert code == 0
    assert "per_task_median" in out and "oracle feature" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["target"] == target and report["max_tokens"] == 400
    assert report["num_train"] + report["num_test"] == 700  # the skipped prompt left out
    ours, constant = report["held_out"]["ngram"], \
        report["held_out"]["constant_median"]
    assert set(ours["accuracy"]) == {"50", "100", "200"}
    assert ours["mae"] < 0.5 * constant["mae"]
    assert report["goals"]["held_out"]["met"] and report["goals"]["prequential"]["met"]
    assert report["prequential"]["ngram"]["num_examples"] == 400


def test_eval_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, labels = write_data(tmp_path, n=50)
    assert main(["predictor", "eval", "--data", str(data),
                 "--labels", str(tmp_path / "none.csv")]) == 2
    assert "none.csv does not exist" in capsys.readouterr().err
    other = tmp_path / "other.jsonl.gz"
    with gzip.open(other, "wt") as f:
        f.write(json.dumps({"id": "z", "prompt_id": "pz", "task": "qa",
                            "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["predictor", "eval", "--data", str(other), "--labels", str(labels)]) == 2
    assert "has no prompt in the data file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predictor", "eval", "--labels", str(labels), "--bucket-widths", "50,0"])
