"""`python -m benchmarks compare`: the same requests against ShuffleInfer and the vLLM
baselines, one system at a time on the same cores, with ratios printed side by side.

For each system in turn: start it, wait until it is healthy, send two warm-up requests,
replay the workload, stop it. Prompts and arrival times are built once, so every system
sees byte-identical requests at identical offsets.
"""

from __future__ import annotations

import argparse
import shlex
import signal
from pathlib import Path
from typing import Any

import httpx

from benchmarks.client import run as run_client
from benchmarks.metrics import format_table, summarize
from benchmarks.prompts import PromptBuilder
from benchmarks.records import RequestRecord, TraceRequest
from benchmarks.replay import Workload, build_workload, measure, write_run
from benchmarks.systems import (
    SYSTEM_NAMES,
    EngineSettings,
    start_system,
    stop_system,
    wait_ready,
)
from shuffleinfer.predictor.label import resolve_dtype

RATIO_KEYS = ["mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_jct_ms",
              "p99_jct_ms", "output_throughput", "output_throughput_per_instance_s",
              "completed", "failed"]
WARMUP = [TraceRequest(arrival_s=0.0, prompt_tokens=64, output_tokens=8),
          TraceRequest(arrival_s=0.0, prompt_tokens=300, output_tokens=8)]


def parse_systems(text: str) -> list[str]:
    """`shuffleinfer,vllm,vllm-rr` -> a list, each name checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEM_NAMES]
    if unknown or not names:
        raise ValueError(f"--systems: unknown {unknown or 'empty list'}; known: "
                         f"{', '.join(SYSTEM_NAMES)}")
    return names


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def subject_ratios(summaries: dict[str, dict[str, Any]],
                   subject: str) -> dict[str, dict[str, float | None]]:
    """Columns `subject/baseline` for every other system: below 1 means the subject has
    less of it (better for latencies, worse for throughputs)."""
    columns: dict[str, dict[str, float | None]] = {}
    for baseline, summary in summaries.items():
        if baseline == subject:
            continue
        column: dict[str, float | None] = {}
        for key in RATIO_KEYS:
            ours, theirs = summaries[subject].get(key), summary.get(key)
            ok = isinstance(ours, int | float) and isinstance(theirs, int | float) and theirs
            column[key] = round(ours / theirs, 3) if ok else None  # type: ignore[operator]
        columns[f"{subject}/{baseline}"] = column
    return columns


def save_metrics(endpoints: list[str], log_dir: Path, name: str) -> None:
    """Keep each server's Prometheus text after the run (`<name>-<i>.metrics.txt`)."""
    for i, url in enumerate(endpoints):
        try:
            text = httpx.get(f"{url}/metrics", timeout=10).text
        except httpx.HTTPError as e:
            text = f"# /metrics unavailable: {e}\n"
        (log_dir / f"{name}-{i}.metrics.txt").write_text(text)


def run_system(name: str, workload: Workload, builder: PromptBuilder, settings: EngineSettings,
               args: argparse.Namespace) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Start one system, replay the workload against it, stop it; records and summary."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"[bold]{name}[/bold]: starting")
    system = start_system(name, settings, args.out / "logs", num_prefill=args.num_prefill,
                          num_decode=args.num_decode, replicas=args.replicas,
                          extra_args=shlex.split(args.shuffleinfer_args))
    try:
        ready_s = wait_ready(system)
        console.print(f"{name}: ready in {ready_s:.0f} s, warming up")
        warm = run_client(WARMUP, [0.0, 0.0], endpoints=system.endpoints,
                            model=settings.model, builder=builder, timeout_s=args.timeout_s,
                            progress=False)
        if not all(r.ok for r in warm):
            raise RuntimeError(f"{name}: warm-up failed: {[r.error for r in warm]}")
        records, duration_s = measure(workload, endpoints=system.endpoints,
                                      model=settings.model, builder=builder,
                                      timeout_s=args.timeout_s)
        save_metrics(system.endpoints, args.out / "logs", name)
    finally:
        stop_system(system)
    summary = summarize(records, duration_s=duration_s, num_instances=system.num_instances,
                        ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms)
    summary["startup_s"] = ready_s
    return records, summary


def run_compare(args: argparse.Namespace) -> int:
    """The `compare` subcommand."""
    from shuffleinfer.model import resolve_model

    systems = parse_systems(args.systems)
    model_path = resolve_model(args.model)
    # A SIGTERM must stop the servers this command started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # This machine's own GPUs decide (no Ray here: each system starts its own).
    dtype = resolve_dtype(args.dtype)
    settings = EngineSettings(model=args.model, model_path=model_path, dtype=dtype,
                              max_model_len=args.max_model_len, chunk_size=args.chunk_size,
                              kv_cache_gib=args.kv_cache_gib, log_steps=args.log_steps)
    workload = build_workload(args, settings.max_model_len)
    builder = PromptBuilder.from_data(model_path, args.data_dir, seed=args.seed)
    runs = {name: run_system(name, workload, builder, settings, args) for name in systems}
    config = {"command": "compare", **vars(args), "settings": vars(settings),
              "workload": workload.describe()}
    write_run(args.out, runs=runs, config=config,
              title=f"{workload.trace.name}: {', '.join(systems)}")
    summaries = {name: summary for name, (_, summary) in runs.items()}
    print(f"{workload.trace.name}: {len(workload.requests)} requests, length scale "
          f"{workload.trace.length_scale:.2f}, over {workload.arrivals_s[-1]:.0f} s")
    print(format_table({**summaries, **subject_ratios(summaries, systems[0])}, RATIO_KEYS))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0
