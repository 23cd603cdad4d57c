"""`python -m benchmarks soak --minutes M --out DIR`: ShuffleInfer under steady load for M
minutes, watched for errors, lost requests, memory growth and stranded KV.

Starts `shuffleinfer serve` (one prefill, one decode instance, as `compare` does), measures
its capacity (requests completed per second when `--probe` requests of the trace arrive at
once), then sends the trace at `--load` times that rate for M minutes while sampling every
`--sample-s`: the server's memory (proportional set size summed over its process tree: api, Ray,
engines), every instance's free KV tokens and running requests, and the requests in
flight. Afterwards it waits for the cluster to go idle and compares each instance's free
KV with where it started.

Reports (stdout, DIR/summary.json, DIR/soak.png): requests sent, completed, failed (an
error status or event) and lost (no answer by the timeout); memory at the start and end
of the load and its trend (MiB per minute, least squares over the second half); free KV
before and after per instance. The goal for 15 minutes: 0 failed, 0 lost, memory and KV
flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from benchmarks.client import run_requests
from benchmarks.compare import WARMUP
from benchmarks.prompts import PromptBuilder
from benchmarks.records import RequestRecord
from benchmarks.replay import build_workload
from benchmarks.systems import EngineSettings, start_system, stop_system, wait_ready


def tree_pss_mib(pid: int, labels: dict[int, str] | None = None,
                 instance_pids: dict[int, str] | None = None) -> dict[str, float]:
    """Proportional set size (MiB) of each process in the tree under `pid`: its private
    pages plus its share of pages it maps with others, so the sum is what the tree really
    holds (RSS would count the KV cache twice once a decode maps its prefill's shared
    cache, and Ray's object store once per process). Keyed by a label
    ("<pid> [<instance>] <command>", as first seen: Ray renames an actor's process with
    the method it runs); `labels` keeps those first sightings across calls, and
    `instance_pids` (pid -> instance id, from /health) names the instance a process
    serves (the actor's own process, or any of its descendants: engine core, worker)."""
    labels = {} if labels is None else labels
    instance_pids = instance_pids or {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    pss = {}
    for p in procs:
        try:
            if p.pid not in labels:
                command = " ".join(p.cmdline()).strip() or p.name()
                if not command.startswith(p.name()):  # name a binary run by path (raylet)
                    command = f"{p.name()}: {command}"
                owner = next((instance_pids[a.pid] for a in [p, *p.parents()]
                              if a.pid in instance_pids), None)
                labels[p.pid] = f"{p.pid} {f'[{owner}] ' if owner else ''}{command[:50]}"
            pss[labels[p.pid]] = p.memory_full_info().pss / 2**20
        except psutil.Error:
            continue
    return pss


def instances(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/health", timeout=30).json()["instances"]  # type: ignore[no-any-return]


class Sampler(threading.Thread):
    """Samples memory and instance loads every `every_s` until stopped."""

    def __init__(self, url: str, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.pid, self.every_s = url, pid, every_s
        self.started = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self._labels: dict[int, str] = {}
        self._instance_pids: dict[int, str] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            row: dict[str, Any] = {"t_s": time.monotonic() - self.started}
            try:
                for x in instances(self.url):
                    if x.get("pid"):
                        self._instance_pids[int(x["pid"])] = x["instance_id"]
                    row[f"free_kv:{x['instance_id']}"] = x["num_free_kv_tokens"]
                    row[f"running:{x['instance_id']}"] = x["num_running_reqs"]
            except (httpx.HTTPError, ValueError):
                row["health_error"] = True
            per_process = tree_pss_mib(self.pid, self._labels, self._instance_pids)
            row["pss_mib"] = sum(per_process.values()) or float("nan")
            row["pss_by_process"] = per_process
            self.rows.append(row)
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def wait_idle(url: str, timeout_s: float = 120, poll_s: float = 1.0) -> list[dict[str, Any]]:
    """Every instance's load once none runs a request or holds KV (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = instances(url)
        if all(x["num_running_reqs"] == 0 and x["kv_cache_usage"] == 0 for x in loads) \
                or time.monotonic() > deadline:
            return loads
        time.sleep(poll_s)


def capacity_rps(url: str, model: str, builder: PromptBuilder, workload: Any,
                 probe: int) -> float:
    """Requests per second completed when `probe` requests of the workload arrive at once."""
    requests = workload.requests[:probe]
    started = time.perf_counter()
    records = asyncio.run(run_requests(requests, [0.0] * len(requests), endpoints=[url],
                                       model=model, builder=builder, progress=False))
    return sum(r.ok for r in records) / (time.perf_counter() - started)


def trend_mib_per_min(rows: list[dict[str, Any]]) -> float:
    """Least-squares slope of memory over the second half of the samples."""
    half = [r for r in rows[len(rows) // 2:] if r["pss_mib"] == r["pss_mib"]]
    if len(half) < 3:
        return float("nan")
    t = np.array([r["t_s"] for r in half]) / 60
    return float(np.polyfit(t, np.array([r["pss_mib"] for r in half]), 1)[0])


def growth_by_process(rows: list[dict[str, Any]], top: int = 6) -> dict[str, dict[str, float]]:
    """The `top` processes whose memory grew most from the first to the last row, with
    their start, end and trend (MiB per minute over the second half)."""
    if not rows:
        return {}
    first, last = rows[0]["pss_by_process"], rows[-1]["pss_by_process"]
    grown = sorted((k for k in first if k in last), key=lambda k: first[k] - last[k])[:top]
    return {k: {"start_mib": round(first[k], 1), "end_mib": round(last[k], 1),
                "trend_mib_per_min": round(trend_mib_per_min(
                    [{"t_s": r["t_s"], "pss_mib": r["pss_by_process"].get(k, float("nan"))}
                     for r in rows]), 2)}
            for k in grown}


def plot(rows: list[dict[str, Any]], load_window: tuple[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, (mem, kv, run) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    mem.plot(t, [r["pss_mib"] for r in rows])
    mem.set_ylabel("server memory, PSS (MiB)")
    keys = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith("free_kv:")})
    for key in keys:
        kv.plot(t, [r.get(f"free_kv:{key}") for r in rows], label=key)
        run.plot(t, [r.get(f"running:{key}") for r in rows], label=key)
    kv.set_ylabel("free KV tokens")
    run.set_ylabel("running requests")
    run.set_xlabel("minutes")
    for ax in (mem, kv, run):
        ax.axvspan(load_window[0] / 60, load_window[1] / 60, color="grey", alpha=0.1)
    kv.legend(fontsize=8)
    fig.suptitle("ShuffleInfer soak (grey: under load)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_soak(args: argparse.Namespace) -> int:
    """The `soak` subcommand."""
    from shuffleinfer.model import resolve_model

    model_path = resolve_model(args.model)
    settings = EngineSettings(model=args.model, model_path=model_path,
                              max_model_len=args.max_model_len)
    args.out.mkdir(parents=True, exist_ok=True)
    args.max_requests, args.duration_s = None, args.minutes * 60
    builder = PromptBuilder.from_data(model_path, args.data_dir, seed=args.seed)
    system = start_system("shuffleinfer", settings, args.out / "logs")
    try:
        wait_ready(system)
        url = system.endpoints[0]
        asyncio.run(run_requests(WARMUP, [0.0, 0.0], endpoints=[url], model=args.model,
                                 builder=builder, progress=False))
        before = {x["instance_id"]: x["num_free_kv_tokens"] for x in wait_idle(url)}
        rate = args.capacity_rps
        if rate is None:
            probe_args = argparse.Namespace(**{**vars(args), "rate": 1.0})
            rate = capacity_rps(url, args.model, builder, build_workload(
                probe_args, args.max_model_len), args.probe)
            wait_idle(url)
        args.rate = args.load * rate
        workload = build_workload(args, args.max_model_len)
        sampler = Sampler(url, system.servers[0].proc.pid, args.sample_s)
        sampler.start()
        load_from = time.monotonic() - sampler.started
        records: list[RequestRecord] = asyncio.run(run_requests(
            workload.requests, workload.arrivals_s, endpoints=[url], model=args.model,
            builder=builder, timeout_s=args.timeout_s))
        load_to = time.monotonic() - sampler.started
        after = {x["instance_id"]: x["num_free_kv_tokens"] for x in wait_idle(url)}
        time.sleep(args.sample_s)
        sampler.stop()
    finally:
        stop_system(system)
    under_load = [r for r in sampler.rows if load_from <= r["t_s"] <= load_to]
    lost = sum(1 for r in records if not r.ok and r.error and "timed out" in r.error.lower())
    summary = {
        "minutes": args.minutes, "trace": args.trace, "capacity_rps": rate,
        "load": args.load, "rate_rps": args.rate, "sent": len(records),
        "completed": sum(r.ok for r in records),
        "failed": sum(not r.ok for r in records) - lost, "lost": lost,
        "memory_mib_start": under_load[0]["pss_mib"] if under_load else None,
        "memory_mib_end": under_load[-1]["pss_mib"] if under_load else None,
        "memory_trend_mib_per_min": trend_mib_per_min(under_load),
        "memory_by_process": growth_by_process(under_load),
        "free_kv_before": before, "free_kv_after": after, "kv_back": before == after,
        "errors": sorted({r.error for r in records if r.error})[:10],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sampler.rows))
    plot(sampler.rows, (load_from, load_to), args.out / "soak.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, indent=2))
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'soak.png'}")
    return 0 if summary["failed"] == 0 and lost == 0 and summary["kv_back"] else 1
