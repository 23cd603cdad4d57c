"""`shuffleinfer simulate`: replay a trace on simulated clusters, with the harness's output.

The requests and their arrivals come from the benchmark harness (`--trace` and the other
workload flags mean what they mean for `python -m benchmarks replay`); each system of
`--cluster` is simulated in turn; DIR gets the harness's `summary.json` (one entry per
system), `config.json`, `<system>.records.jsonl` and plots. Times in the records are
simulated seconds. Inter-token gaps are not simulated (a decode's tokens are spread over
its steps only in sum: TPOT is exact, ITL is reported as 0). `--workers 2` (the default on
a machine with two cores or more) runs a disaggregated cluster without flips on two
processes, with the same result (`split.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shuffleinfer.config import ServeConfig
from shuffleinfer.scheduler.policies.flip import FlipConfig
from shuffleinfer.sim.cost import COST_MODELS, LinearCost, make_cost_model
from shuffleinfer.sim.simulator import SimConfig, simulate
from shuffleinfer.sim.split import simulate_in_two

_CLUSTER = re.compile(r"^(?:(\d+)p(\d+)d|(?:vllm|colocated):(\d+))$")


def parse_clusters(text: str) -> list[tuple[str, SimConfig]]:
    """`2p2d,vllm:4` -> [("shuffleinfer-2p2d", 2 prefill + 2 decode), ("vllm-4", 4
    colocated)]; raises ValueError naming the bad item."""
    systems = []
    for item in (x.strip().lower() for x in text.split(",")):
        m = _CLUSTER.match(item)
        if m is None or (m.group(3) is None and min(int(m.group(1)), int(m.group(2))) < 1) \
                or (m.group(3) is not None and int(m.group(3)) < 1):
            raise ValueError(f"bad cluster {item!r}: give NpMd (N prefill and M decode "
                             "instances, each >= 1) or vllm:N (N colocated instances)")
        if m.group(3) is not None:
            systems.append((f"vllm-{m.group(3)}", SimConfig(colocated=int(m.group(3)))))
        else:
            systems.append((f"shuffleinfer-{item}",
                            SimConfig(num_prefill=int(m.group(1)), num_decode=int(m.group(2)))))
    return systems


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    from benchmarks.replay import add_workload_args

    defaults = ServeConfig.model_validate({})
    p = subparsers.add_parser(
        "simulate", help="simulate clusters on a trace with the real scheduling policies",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_workload_args(p)
    p.set_defaults(max_requests=None, handler=_run)
    p.add_argument("--cluster", required=True, metavar="SPEC",
                   help="comma-separated systems: NpMd (ShuffleInfer) or vllm:N (colocated)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--cost-model", default="a100-opt13b",
                   help=f"step latency model: cpu (fitted by `shuffleinfer calibrate "
                   f"--profile`) or one of {', '.join(COST_MODELS)}")
    p.add_argument("--cost-profile", type=Path, default=None,
                   help="the cpu model's file (default: where calibrate --profile saves it)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="scale the trace's lengths into this context, as replay does")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--kv-capacity-tokens", type=int, default=SimConfig.kv_capacity_tokens,
                   help="KV cache per instance, in tokens")
    p.add_argument("--prefill-order", default=defaults.prefill_order)
    p.add_argument("--prefill-policy", default=defaults.prefill_policy)
    p.add_argument("--decode-policy", default="shuffle")
    p.add_argument("--admission", default=defaults.admission)
    p.add_argument("--flip-policy", default="never")
    p.add_argument("--flip-idle-s", type=float, default=defaults.flip_idle_s)
    p.add_argument("--oracle-accuracy", type=float, default=1.0,
                   help="share of decodes whose predicted length bucket is right")
    p.add_argument("--bucket-width", type=int, default=200)
    p.add_argument("--monitor-interval-ms", type=float, default=defaults.monitor_interval_ms)
    p.add_argument("--workers", type=int, choices=(1, 2), default=min(2, os.cpu_count() or 1),
                   help="processes per simulation: 2 runs a disaggregated cluster's prefill "
                        "side beside its decode side (same result; not with flips)")


def _configure(args: argparse.Namespace, base: SimConfig) -> SimConfig:
    return dataclasses.replace(
        base, chunk_size=args.chunk_size, kv_capacity_tokens=args.kv_capacity_tokens,
        prefill_order=args.prefill_order, prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy, admission=args.admission,
        flip_policy=args.flip_policy, flip=FlipConfig(flip_idle_s=args.flip_idle_s),
        oracle_accuracy=args.oracle_accuracy, bucket_width=args.bucket_width,
        monitor_interval_s=args.monitor_interval_ms / 1000, seed=args.seed,
        max_tokens=args.max_model_len or SimConfig.max_tokens)


def _validated(args: argparse.Namespace) -> tuple[list[tuple[str, SimConfig]], LinearCost]:
    """Every system's config and the cost model; ValueError naming the flag."""
    try:
        systems = parse_clusters(args.cluster)
    except ValueError as e:
        raise ValueError(f"--cluster: {e}") from None
    try:
        configs = [(name, _configure(args, base)) for name, base in systems]
    except ValueError as e:
        raise ValueError(f"--chunk-size/--kv-capacity-tokens: {e}") from None
    try:
        cost = make_cost_model(args.cost_model, args.cost_profile)
    except ValueError as e:
        raise ValueError(f"--cost-model: {e}") from None
    _check_policies(args)
    return configs, cost


def _check_policies(args: argparse.Namespace) -> None:
    """The policy names, checked as `serve` checks them (ServeConfig's validators)."""
    from pydantic import ValidationError

    names = ("prefill_order", "prefill_policy", "decode_policy", "admission", "flip_policy")
    try:
        ServeConfig.model_validate({n: getattr(args, n) for n in names})
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        raise ValueError(f"{flag}: {err['msg']}") from None
    if not 0 <= args.oracle_accuracy <= 1:
        raise ValueError(f"--oracle-accuracy must be in [0, 1], got {args.oracle_accuracy}")


def _run(args: argparse.Namespace) -> int:
    from benchmarks.metrics import format_table, summarize
    from benchmarks.replay import build_workload, write_run

    try:
        configs, cost = _validated(args)
        workload = build_workload(args, args.max_model_len)
    except ValueError as e:
        print(f"shuffleinfer simulate: error: {e}", file=sys.stderr)
        return 2
    requests = [dataclasses.replace(r, arrival_s=t)
                for r, t in zip(workload.requests, workload.arrivals_s, strict=True)]
    runs: dict[str, tuple[list[Any], dict[str, Any]]] = {}
    for name, config in configs:
        with tqdm(total=len(requests), desc=name, unit="req") as bar:
            run = simulate_in_two if args.workers == 2 else simulate
            result = run(requests, config, cost, name, progress=bar.update)
        summary = summarize(result.records, duration_s=result.duration_s,
                            num_instances=result.num_instances,
                            ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms)
        summary["num_flips"] = result.num_flips
        runs[name] = (result.records, summary)
    config_out = {"workload": workload.describe(), "cost_model": dataclasses.asdict(cost),
                  "systems": {n: dataclasses.asdict(c) for n, c in configs},
                  "argv": sys.argv[1:]}
    write_run(args.out, runs=runs, config=config_out, title=f"simulated {workload.trace.name}")
    keys = ["completed", "mean_ttft_ms", "p99_ttft_ms", "mean_jct_ms", "mean_tpot_ms",
            "request_throughput", "instance_seconds"]
    print(format_table({n: s for n, (_, s) in runs.items()}, keys))
    print(f"wrote {args.out / 'summary.json'}")
    return 0
