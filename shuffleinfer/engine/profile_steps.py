"""`shuffleinfer calibrate --profile`: time engine steps of many shapes on the real engine
and fit the simulator's `cpu` cost model (`shuffleinfer.sim.cost`) to them.

The engine is set up as `calibrate` sets it up (a serving instance's dtype, cores and KV
cache; prefix caching off) and timed step by step (`step_timer.py`). Each prefill case of
the plan (`step_plan.py`) runs once untimed (oneDNN builds its kernels per shape), then
`repeats` times; each step shape's median counts. Each decode case runs once; the median
of its steps with the whole batch decoding counts. The KV hand-over speed is the shm
transport's, what a prefill and a decode instance on one host use, measured by
`shuffleinfer.kv.bench` before the engine starts.
"""

from __future__ import annotations

import datetime
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from shuffleinfer.config import ServeConfig
from shuffleinfer.engine.profile_report import format_report, format_table, write_plot
from shuffleinfer.engine.step_plan import (
    FULL_PLAN,
    QUICK_PLAN,
    DecodeCase,
    KVGeometry,
    ProfilePlan,
    StepSample,
    StepShape,
    kv_geometry,
    planned_steps,
)
from shuffleinfer.engine.step_timer import ProfileError, RunsSteps, StepTimer
from shuffleinfer.sim.cost import fit_cost_model

_RUN_FAILED = 1


def measure(timer: RunsSteps, plan: ProfilePlan, repeats: int) -> tuple[list[StepSample], int]:
    """The median step of every shape the plan makes, prefill then decode, and how many
    runs the engine split otherwise than planned (the steps that ran count)."""
    prefill: dict[StepShape, list[float]] = {}
    labels: dict[StepShape, str] = {}
    decode = []
    num_unplanned = 0
    with tqdm(total=len(plan.prefill) * (repeats + 1) + len(plan.decode), desc="profiling",
              unit="run") as bar:
        for prefill_case in plan.prefill:
            bar.set_postfix(prefill=prefill_case.label)
            planned = planned_steps(prefill_case.prompt_lens, plan.budget)
            for run in range(repeats + 1):
                steps = timer.run(prefill_case.prompt_lens, max_tokens=1)
                num_unplanned += [shape for shape, _ in steps] != planned
                for i, (shape, seconds) in enumerate(steps):
                    part = f" step {i + 1}/{len(steps)}" if len(steps) > 1 else ""
                    labels.setdefault(shape, f"prefill {prefill_case.label}{part}")
                    if run:  # the first run builds kernels
                        prefill.setdefault(shape, []).append(seconds)
                bar.update(1)
        for decode_case in plan.decode:
            bar.set_postfix(decode=decode_case.label)
            prompt_lens = [decode_case.prompt_len] * decode_case.batch
            steps = timer.run(prompt_lens, decode_case.max_tokens)
            num_unplanned += [shape for shape, _ in steps] != planned_steps(
                prompt_lens, plan.budget, decode_case.max_tokens)
            decode.append(_decode_sample(decode_case, steps))
            bar.update(1)
    return [StepSample(labels[shape], shape, statistics.median(seconds), len(seconds))
            for shape, seconds in prefill.items()] + decode, num_unplanned


def _decode_sample(case: DecodeCase, steps: list[tuple[StepShape, float]]) -> StepSample:
    """The median of the steps that decode the whole batch, after the first few."""
    whole = [(shape, seconds) for shape, seconds in steps
             if not shape.tokens and shape.batch == case.batch][case.skip_steps:]
    if not whole:
        raise ProfileError(f"decode {case.label}: no step after the first {case.skip_steps} "
                           f"ran all {case.batch} decodes together")
    context = round(statistics.median(shape.context for shape, _ in whole))
    return StepSample(f"decode {case.label}", StepShape(batch=case.batch, context=context),
                      statistics.median(seconds for _, seconds in whole), len(whole))


def measure_link(geometry: KVGeometry, mib: float, rounds: int) -> tuple[float, str]:
    """Bytes/s of a KV hand-over between two processes on this host by the shm transport
    (`shuffleinfer.kv.bench`, median of `rounds`), and how it was measured. If the
    bench fails, half a 256 MiB memcpy's speed (shm copies once on each side), said so."""
    import torch

    from shuffleinfer.kv.bench import CacheShape, run

    shape = CacheShape(num_layers=geometry.num_layers, kv_heads=geometry.num_kv_heads,
                       head_size=geometry.head_dim, dtype=getattr(torch, geometry.dtype))
    nbytes = max(1, math.ceil(mib * (1 << 20) / shape.block_bytes)) * shape.block_bytes
    try:
        seconds = statistics.median(run(mib, rounds, shape)["shm"][1:])
        return nbytes / seconds, (f"shm transport by shuffleinfer.kv.bench, "
                                  f"{nbytes / (1 << 20):.0f} MiB, median of {rounds}")
    except (RuntimeError, OSError) as e:
        print(f"shuffleinfer calibrate: the shm bench failed ({e}); estimating the link "
              "from a memcpy", file=sys.stderr)
    import numpy as np

    src = np.ones(256 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(3):
        started_at = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started_at)
    return src.nbytes / best / 2, "half a 256 MiB numpy memcpy (best of 3); the shm bench failed"


def run_profile(config: ServeConfig, model_path: str, dtype: str, *, quick: bool,
                repeats: int, seed: int, out: Path) -> int:
    """Measure the link and the steps, fit, print the table and fit, write the JSON
    (`make_cost_model("cpu", out)` reads it) and a PNG beside it; the exit code."""
    import vllm
    from transformers import AutoConfig

    plan = QUICK_PLAN if quick else FULL_PLAN
    geometry = kv_geometry(AutoConfig.from_pretrained(model_path), dtype)
    link_bytes_per_s, link_source = measure_link(geometry, *((8, 1) if quick else (64, 3)))
    try:
        timer = StepTimer(model_path, dtype=dtype, plan=plan, seed=seed,
                          engine_args=config.engine_args)
        samples, num_unplanned = measure(timer, plan, repeats)
    except ProfileError as e:
        print(f"shuffleinfer calibrate: error: {e}", file=sys.stderr)
        return _RUN_FAILED
    if num_unplanned:
        print(f"shuffleinfer calibrate: {num_unplanned} runs were split into other steps "
              "than planned; the table shows the steps that ran", file=sys.stderr)
    model, report = fit_cost_model(
        "cpu", [(s.shape.tokens, s.shape.attn, s.seconds) for s in samples if not s.shape.batch],
        [(s.shape.batch, s.shape.context, s.seconds) for s in samples if s.shape.batch],
        kv_bytes_per_token=geometry.bytes_per_token, link_bytes_per_s=link_bytes_per_s)
    cores = f"{config.cpus_per_instance} core{'s' if config.cpus_per_instance > 1 else ''}"
    title = f"{config.model} ({dtype}, {cores}, vLLM {vllm.__version__})"
    model = replace(model, source=(
        f"shuffleinfer calibrate --profile{' --profile-quick' if quick else ''}: {title}, "
        f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; mean relative "
        f"error prefill {report.prefill_mean_rel_error:.1%} over {report.num_prefill_steps} "
        f"step shapes, decode {report.decode_mean_rel_error:.1%} over "
        f"{report.num_decode_steps}; KV link: {link_source}"))
    print(format_table(samples, model), flush=True)
    print(format_report(model, report), flush=True)
    try:
        model.save(out)
        write_plot(samples, model, out.with_suffix(".png"), title)
    except OSError as e:
        print(f"shuffleinfer calibrate: error: {e}", file=sys.stderr)
        return _RUN_FAILED
    print(f"saved {out} and {out.with_suffix('.png')}", flush=True)
    return 0
