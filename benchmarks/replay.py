"""`python -m benchmarks replay`: send a trace's requests to an endpoint, open loop, and
write what was measured.

The pieces are shared with `compare`: `build_workload` turns a trace spec into the exact
requests and arrival times, `measure` replays them against one system, `write_run` writes
the records, summaries and plots of one or several systems.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.client import run as run_client
from benchmarks.metrics import summarize
from benchmarks.plots import write_plots
from benchmarks.prompts import PromptBuilder
from benchmarks.records import RequestRecord, Trace, TraceRequest
from benchmarks.traces import load_trace
from benchmarks.traces.arrivals import arrival_times

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
UNTIMED_RATE = 0.5
"""Requests/s for a trace without timestamps (a workload class) when --rate is not given."""


@dataclass(frozen=True)
class Workload:
    """The requests one run sends and when each leaves (seconds after the start)."""

    trace: Trace
    requests: list[TraceRequest]
    arrivals_s: list[float]

    def describe(self) -> dict[str, Any]:
        """What summary.json says about the workload."""
        return {"trace": self.trace.name, "source": self.trace.source,
                "length_scale": self.trace.length_scale, "num_requests": len(self.requests),
                "span_s": self.arrivals_s[-1] if self.arrivals_s else 0.0,
                "prompt_tokens": sum(r.prompt_tokens for r in self.requests),
                "output_tokens": sum(r.output_tokens for r in self.requests)}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Flags that pick the requests (shared by replay and compare)."""
    p.add_argument("--trace", required=True, metavar="SPEC",
                   help="azure2023-code, azure2023-conv, mooncake, sharegpt, lpld, lphd, "
                   "hpld, hphd, mixed, or FORMAT:PATH (azure, mooncake, burstgpt, "
                   "sharegpt-lengths)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="speed-up of the trace's own timestamps (2 = twice as fast)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s with Gamma arrivals instead of the trace's timestamps "
                   f"(default for traces without timestamps: {UNTIMED_RATE})")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the arrivals (1 = Poisson, < 1 = burstier)")
    p.add_argument("--max-requests", type=int, default=60, help="send at most N requests")
    p.add_argument("--duration-s", type=float, default=None,
                   help="send only requests arriving in the first S seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="the shared data folder (traces, lengths, prompts)")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="TTFT SLO for goodput")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="TPOT SLO for goodput")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")


def check_workload_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible flag values with a message naming the flag."""
    for flag in ("time_scale", "rate", "burstiness", "duration_s", "timeout_s"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.max_requests is not None and args.max_requests < 1:
        p.error(f"--max-requests must be >= 1, got {args.max_requests}")


def build_workload(args: argparse.Namespace, max_model_len: int | None) -> Workload:
    """Read the trace, time its arrivals and keep the requests within the limits."""
    trace = load_trace(args.trace, data_dir=args.data_dir, max_model_len=max_model_len,
                       seed=args.seed)
    rate = args.rate if args.rate is not None or trace.timed else UNTIMED_RATE
    arrivals = arrival_times(trace, time_scale=args.time_scale, rate=rate,
                             burstiness=args.burstiness, seed=args.seed)
    keep = [i for i, t in enumerate(arrivals)
            if args.duration_s is None or t <= args.duration_s]
    if args.max_requests is not None:
        keep = keep[:args.max_requests]
    if not keep:
        raise ValueError(f"trace {args.trace!r} has no request within the limits")
    return Workload(trace, [trace.requests[i] for i in keep], [arrivals[i] for i in keep])


def served_max_model_len(endpoint: str, model: str, api_key: str | None = None) -> int | None:
    """The context length a server reports in /v1/models (vLLM and ShuffleInfer do)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        body = httpx.get(f"{endpoint}/v1/models", headers=headers, timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None
    for card in body.get("data", []):
        if card.get("id") == model and card.get("max_model_len"):
            return int(card["max_model_len"])
    return None


def measure(workload: Workload, *, endpoints: list[str], model: str, builder: PromptBuilder,
            timeout_s: float, api_key: str | None = None) -> tuple[list[RequestRecord], float]:
    """Replay the workload against `endpoints`; returns the records and the wall time."""
    started = time.perf_counter()
    records = run_client(workload.requests, workload.arrivals_s, endpoints=endpoints,
                           model=model, builder=builder, timeout_s=timeout_s,
                           api_key=api_key)
    return records, time.perf_counter() - started


def write_run(out: Path, *, runs: dict[str, tuple[list[RequestRecord], dict[str, Any]]],
              config: dict[str, Any], title: str) -> list[Path]:
    """Write DIR/summary.json, DIR/config.json, DIR/<system>.records.jsonl and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    for name, (records, _) in runs.items():
        with open(out / f"{name}.records.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps({**asdict(r), "ttft_s": r.ttft_s, "e2e_s": r.e2e_s,
                                    "jct_s": r.jct_s, "tpot_s": r.tpot_s}) + "\n")
    summary = {name: s for name, (_, s) in runs.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return write_plots({name: records for name, (records, _) in runs.items()}, out,
                       title=title)


def run_replay(args: argparse.Namespace) -> int:
    """The `replay` subcommand."""
    from rich.console import Console

    from benchmarks.metrics import DEFAULT_TABLE_KEYS, format_table

    console = Console(stderr=True)
    endpoints = [e.rstrip("/") for part in args.endpoint for e in part.split(",") if e]
    max_model_len = args.max_model_len or served_max_model_len(endpoints[0], args.model,
                                                               args.api_key)
    workload = build_workload(args, max_model_len)
    builder = PromptBuilder.from_data(args.tokenizer or tokenizer_for(args.model),
                                      args.data_dir, seed=args.seed)
    console.print(f"replaying {len(workload.requests)} requests of {workload.trace.name} "
                  f"over {workload.arrivals_s[-1]:.0f} s against {', '.join(endpoints)}")
    records, duration_s = measure(workload, endpoints=endpoints, model=args.model,
                                  builder=builder, timeout_s=args.timeout_s,
                                  api_key=args.api_key)
    summary = summarize(records, duration_s=duration_s, num_instances=args.instances,
                        ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms)
    config = {"command": "replay", **vars(args), "workload": workload.describe()}
    plots = write_run(args.out, runs={"replay": (records, summary)}, config=config,
                      title=f"{workload.trace.name} @ {', '.join(endpoints)}")
    print(format_table({"replay": summary}, DEFAULT_TABLE_KEYS))
    console.print(f"wrote {args.out / 'summary.json'} and {len(plots)} plots")
    return 0 if summary["completed"] else 1


def tokenizer_for(model: str) -> str:
    """The tokenizer to count prompt tokens with: an embedded model's path, else `model`."""
    from shuffleinfer.model import resolve_model

    return resolve_model(model)
