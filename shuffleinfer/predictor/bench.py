"""Latency of `predict` on real prompts: `python -m shuffleinfer.predictor.bench [--n N]`.

Fits the predictor on a few hundred real prompts (their reference answers' lengths in
characters / 4 stand in for labels: the model's accuracy does not matter here, only its
cost), then times `predict` on other prompts, one at a time, and prints p50 / p99 / max.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shuffleinfer.predictor.config import NgramPredictorConfig
from shuffleinfer.predictor.data import PromptRecord, default_prompts_file, iter_prompts
from shuffleinfer.predictor.learned import NgramPredictor
from shuffleinfer.scheduler.prediction import PredictorInput


@dataclass(frozen=True)
class Latency:
    """Percentiles of one predict call, in milliseconds: wall time (what a request waits,
    including time the OS gave the core to others) and the thread's CPU time (the
    predictor's own cost)."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_p50_ms: float
    cpu_p99_ms: float
    num_calls: int


def _request(record: PromptRecord, max_tokens: int = 512) -> PredictorInput:
    text = record.last_user_text
    chars = sum(len(str(m.get("content", ""))) for m in record.messages)
    return PredictorInput(num_prompt_tokens=max(chars // 4, 1), prompt_text=text,
                          max_tokens=max_tokens, is_chat=True, temperature=0.0)


def measure(predictor: NgramPredictor, requests: Sequence[PredictorInput]) -> Latency:
    """Time `predictor.predict` on each request (after one warm-up call)."""
    predictor.predict(requests[0])
    wall, cpu = [], []
    for request in requests:
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        predictor.predict(request)
        cpu.append(time.thread_time_ns() - start_cpu)
        wall.append(time.perf_counter_ns() - start)
    ms, cpu_ms = np.array(wall) / 1e6, np.array(cpu) / 1e6
    return Latency(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                   float(ms.max()), float(np.percentile(cpu_ms, 50)),
                   float(np.percentile(cpu_ms, 99)), len(ms))


def main(argv: Sequence[str] | None = None) -> int:
    """Fit on the first 500 prompts of the file, time predict on the next `--n`."""
    parser = argparse.ArgumentParser(prog="python -m shuffleinfer.predictor.bench")
    parser.add_argument("--data", type=Path, default=default_prompts_file())
    parser.add_argument("--n", type=int, default=5000, help="predictions to time")
    args = parser.parse_args(argv)
    records = []
    for record in iter_prompts(args.data):
        records.append(record)
        if len(records) >= 500 + args.n:
            break
    train = [_request(r) for r in records[:500]]
    lengths = [min(len(r.response) // 4, 512) for r in records[:500]]
    predictor = NgramPredictor(NgramPredictorConfig())
    predictor.fit(train, lengths)
    latency = measure(predictor, [_request(r) for r in records[500:]])
    print(f"predict over {latency.num_calls} real prompts: wall p50 {latency.p50_ms:.3f} ms, "
          f"p99 {latency.p99_ms:.3f} ms, max {latency.max_ms:.3f} ms; CPU time p50 "
          f"{latency.cpu_p50_ms:.3f} ms, p99 {latency.cpu_p99_ms:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
