"""`python -m benchmarks replay|compare|soak|kv ...` (run from the repository root)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.kv import add_kv_parser, run_kv
from benchmarks.replay import DEFAULT_DATA_DIR, add_workload_args, check_workload_args
from benchmarks.systems import SYSTEM_NAMES

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def _replay_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("replay", help="replay a trace against an OpenAI endpoint",
                              description="Open-loop replay of a trace against any "
                              "OpenAI-compatible endpoint; writes DIR/summary.json, the "
                              "per-request records and plots.")
    p.add_argument("--endpoint", action="append", required=True, metavar="URL",
                   help="base URL, e.g. http://127.0.0.1:8000 (repeat or comma-separate "
                   "for round robin)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name the server answers to")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to size prompts with (default: the model's)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context to scale trace lengths into (default: what the server "
                   "reports in /v1/models)")
    p.add_argument("--instances", type=int, default=1,
                   help="instances the endpoint occupies, for throughput per instance-second")
    p.add_argument("--api-key", default=None)
    add_workload_args(p)
    return p


def _compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="start each system, replay, compare",
                              description="Start ShuffleInfer and the vLLM baselines one "
                              "at a time on the same cores and model, replay the same "
                              "requests against each, and print ratios side by side.")
    p.add_argument("--systems", default="shuffleinfer,vllm",
                   help=f"comma-separated, first one is compared to the others "
                   f"(known: {', '.join(SYSTEM_NAMES)})")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--dtype", default="auto",
                   help="for every system; auto = what `shuffleinfer serve` uses (float32 on "
                   "CPU: bfloat16 is slower on CPUs without AVX512-BF16)")
    p.add_argument("--max-model-len", type=int, default=1024,
                   help="context of every system; trace lengths are scaled into it")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--kv-cache-gib", type=int, default=2, help="KV cache per core")
    p.add_argument("--num-prefill", type=int, default=1, help="ShuffleInfer prefill instances")
    p.add_argument("--num-decode", type=int, default=1, help="ShuffleInfer decode instances")
    p.add_argument("--replicas", type=int, default=None,
                   help="vllm-rr replicas (default: one per core)")
    p.add_argument("--log-steps", action="store_true",
                   help="every engine logs each step it runs (for the simulator's served "
                   "cost model: python -m benchmarks.sim_fidelity)")
    p.add_argument("--shuffleinfer-args", default="",
                   help="extra `shuffleinfer serve` flags, quoted as one string")
    add_workload_args(p)
    # The defaults finish within about 10 minutes here: each system takes 2-3 minutes to
    # start on CPU (vllm-rr, opt-in, about 3.5 more).
    p.set_defaults(max_requests=20)
    return p


def _soak_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("soak", help="steady load on ShuffleInfer for M minutes",
                              description="Start ShuffleInfer, load it at a share of its "
                              "measured capacity for M minutes, and report errors, lost "
                              "requests, memory and free KV over time (DIR/summary.json, "
                              "DIR/soak.png).")
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--trace", default="mixed", metavar="SPEC",
                   help="lengths to send (as replay's --trace), with Poisson arrivals")
    p.add_argument("--load", type=float, default=0.9,
                   help="arrival rate as a share of the measured capacity")
    p.add_argument("--capacity-rps", type=float, default=None,
                   help="skip the capacity probe and take this many requests/s")
    p.add_argument("--probe", type=int, default=16,
                   help="requests sent at once to measure capacity")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    p.set_defaults(time_scale=1.0, burstiness=1.0, rate=None, max_requests=None,
                   duration_s=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one subcommand."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    replay = _replay_parser(subparsers)
    compare = _compare_parser(subparsers)
    soak = _soak_parser(subparsers)
    kv = add_kv_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "kv":
        if args.block_size < 1:
            kv.error("--block-size must be >= 1")
        return run_kv(args)
    sub = {"replay": replay, "compare": compare, "soak": soak}[args.command]
    if args.command == "soak":
        for flag in ("minutes", "load", "capacity_rps", "sample_s", "timeout_s"):
            value = getattr(args, flag)
            if value is not None and not value > 0:
                sub.error(f"--{flag.replace('_', '-')} must be > 0, got {value}")
        if args.probe < 1 or args.max_model_len < 1:
            sub.error("--probe and --max-model-len must be >= 1")
    check_workload_args(sub, args)
    for flag in ("instances", "max_model_len", "chunk_size", "kv_cache_gib", "num_prefill",
                 "num_decode", "replicas"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            sub.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    try:
        if args.command == "soak":
            from benchmarks.soak import run_soak

            return run_soak(args)
        if args.command == "replay":
            from benchmarks.replay import run_replay

            return run_replay(args)
        from benchmarks.compare import parse_systems, run_compare

        parse_systems(args.systems)
        return run_compare(args)
    except (ValueError, OSError) as e:
        print(f"python -m benchmarks {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
