"""The served cost model: vLLM's iteration lines are read per engine (Ray's actor prefix or
the log's own engine), the fit recovers a model from steps that mix prompt work and
decodes, and the overheads outside the steps are recovered from a run's mean TTFT and
JCT."""

from __future__ import annotations

import dataclasses
import random
import statistics
from pathlib import Path

import pytest

from benchmarks.records import TraceRequest
from shuffleinfer.sim.cost import LinearCost, StepSample
from shuffleinfer.sim.served import (
    fit_overheads,
    fit_served,
    read_run_steps,
    read_steps,
    with_step_overhead,
)
from shuffleinfer.sim.simulator import SimConfig, simulate

RAY = ("\x1b[36m(EngineInstance(decode-0, decode) pid=16468)\x1b[0m (MainProcess pid=16468) "
       "INFO 11-30 20:54:44 [loggers.py:199] Engine 000: ")
VLLM = "(APIServer pid=9) INFO 11-30 20:54:44 [loggers.py:199] Engine 000: "


def iteration(ctx_reqs: int, ctx_tokens: int, gen: int, ms: float, kv_pct: float,
              dummy: bool = False) -> str:
    return (f"Iteration(7): {ctx_reqs} context requests, {ctx_tokens} context tokens, "
            f"{gen} generation requests, {gen} generation tokens, iteration elapsed time: "
            f"{ms:.2f} ms{' (dummy)' if dummy else ''}, CPU KV cache usage: {kv_pct:.1f}%")


def test_iteration_lines_become_steps_of_their_engine() -> None:
    lines = [
        RAY + iteration(0, 0, 3, 60.0, 10.0),
        RAY.replace("decode-0, decode", "prefill-0, prefill") + iteration(2, 300, 0, 400.0, 1.0),
        RAY + iteration(1, 1, 2, 70.0, 10.0),  # a handed-over decode's first step
        RAY + iteration(0, 0, 0, 1.0, 0.0, dummy=True),
        "(EngineInstance(decode-0, decode) pid=1) INFO some other line",
    ]
    steps = read_steps(lines, kv_capacity_tokens=1000, default_engine="log")
    assert steps == {
        "decode-0": [StepSample(0, 0.0, 3, 100, 0.060), StepSample(0, 0.0, 3, 100, 0.070)],
        "prefill-0": [StepSample(300, 300 * 300 / 2, 0, 0, 0.400)]}
    # A `vllm serve` log has no actor prefix: its steps belong to the log.
    assert list(read_steps([VLLM + iteration(1, 64, 5, 90.0, 3.0)], 1000, "vllm-rr-0")) \
        == ["vllm-rr-0"]


TRUE = LinearCost("true", prefill_base_s=0.06, prefill_per_token_s=0.002,
                  prefill_per_attn_s=0.0, decode_base_s=0.05, decode_per_req_s=0.005,
                  decode_per_ctx_s=1e-5, kv_bytes_per_token=1000, link_bytes_per_s=1e9)


def test_the_fit_recovers_a_model_from_mixed_steps_and_ignores_stalls(tmp_path: Path) -> None:
    rng = random.Random(0)
    lines = []
    for i in range(300):
        tokens = rng.choice([0, 0, 0, 64, 256])
        batch = rng.randint(1, 8)
        context = batch * rng.randint(50, 500)
        seconds = TRUE.step_s(tokens, tokens * tokens, batch, context)
        if i % 50 == 0:
            seconds *= 10  # stalled on something else
        lines.append(VLLM + iteration(1 if tokens else 0, tokens, batch, 1000 * seconds,
                                      100 * context / 100_000))
    (tmp_path / "vllm-rr-0.log").write_text("\n".join(lines))
    steps = read_run_steps([tmp_path / "vllm-rr-0.log"], kv_capacity_tokens=100_000)
    assert len(steps) == 298  # the two warm-up steps left out
    model, report = fit_served("fit", steps, kv_bytes_per_token=1000, link_bytes_per_s=1e9,
                               source="test")
    for field in ("prefill_base_s", "prefill_per_token_s", "decode_base_s",
                  "decode_per_req_s", "decode_per_ctx_s"):
        assert getattr(model, field) == pytest.approx(getattr(TRUE, field), rel=0.05), field
    assert report.decode_mean_rel_error < 0.02


def test_overheads_outside_the_steps_are_recovered_from_a_runs_means() -> None:
    rng = random.Random(1)
    t, requests = 0.0, []
    for _ in range(40):
        t += rng.expovariate(0.5)
        requests.append(TraceRequest(t, rng.randint(10, 600), rng.randint(2, 100)))
    config = SimConfig(num_prefill=1, num_decode=1, chunk_size=256, kv_capacity_tokens=40_000)
    real = simulate(requests, dataclasses.replace(config, request_overhead_s=0.12),
                    with_step_overhead(TRUE, 0.02))
    ttft = statistics.mean(r.ttft_s or 0.0 for r in real.records)
    jct = statistics.mean(r.jct_s or 0.0 for r in real.records)
    model, request_s = fit_overheads(TRUE, config, requests, ttft, jct)
    assert model.decode_base_s - TRUE.decode_base_s == pytest.approx(0.02, abs=0.0021)
    assert request_s == pytest.approx(0.12, abs=0.011)
