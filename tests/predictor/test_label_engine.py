"""The label command end to end with the real engine and the default model (slow: starts
vLLM, about a minute on 2 cores): four real prompts, one from each of four tasks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shuffleinfer.predictor.data import default_prompts_file
from shuffleinfer.predictor.labels import read_labels

pytestmark = pytest.mark.engine


@pytest.mark.skipif(not default_prompts_file().is_file(), reason="needs ../shared/data")
def test_label_four_real_prompts_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    command = [sys.executable, "-m", "shuffleinfer", "predictor", "label", "--out", str(out),
               "--limit", "4", "--max-tokens", "24", "--max-prompt-tokens", "1024",
               "--engine-arg", "enforce_eager=true"]  # (no torch.compile: a minute sooner)
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_labels(out)
    assert len(rows) == 4 and len({r.task for r in rows}) == 4
    for row in rows:
        if row.greedy_output_tokens is None:  # only a prompt over 1024 tokens may be skipped
            assert row.prompt_tokens > 1024
            continue
        for n, reason in ((row.greedy_output_tokens, row.greedy_finish_reason),
                          (row.sampled_output_tokens, row.sampled_finish_reason)):
            assert n is not None and 1 <= n <= 24
            assert reason in ("stop", "length")
            assert n == 24 or reason == "stop"  # cut short only at max_tokens
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 already labelled, 0 labelled now" in again.stderr
    assert read_labels(out) == rows
