"""How close the simulator comes to real runs on this machine.

    python -m benchmarks compare --systems shuffleinfer,vllm-rr --trace mixed --rate 0.25 \\
        --max-requests 40 --max-model-len 1024 --out runs/real
    python -m benchmarks.sim_fidelity --real runs/real [--cost-profile FILE]

Replays the very requests of a `compare` run (arrival, prompt and output lengths from its
records) in the simulator with the `cpu` cost model (`shuffleinfer calibrate --profile`)
and the real systems' settings: ShuffleInfer as its prefill and decode instances (one core
each), `vllm-rr` as that many colocated single-core instances placed in turn. A colocated
`vllm` server on several cores is not simulated (the profile is of one core). Prints, per
system, real and simulated mean TTFT and JCT and their relative error against the goal
(within 15 %); writes DIR/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.records import TraceRequest
from shuffleinfer.sim.cost import make_cost_model
from shuffleinfer.sim.simulator import SimConfig, simulate

GOAL = 0.15


def read_requests(path: Path) -> list[TraceRequest]:
    """The requests a run sent, from its records, in arrival order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["scheduled_at_s"])
    return [TraceRequest(r["scheduled_at_s"], r["prompt_tokens"], r["max_tokens"]) for r in rows]


def sim_config(system: str, compare: dict[str, Any], kv_tokens: int) -> SimConfig | None:
    common = dict(chunk_size=compare.get("chunk_size", 512), kv_capacity_tokens=kv_tokens,
                  max_tokens=compare.get("max_model_len", 1024))
    if system == "shuffleinfer":
        return SimConfig(num_prefill=compare.get("num_prefill", 1),
                         num_decode=compare.get("num_decode", 1), prefill_order="sjf",
                         decode_policy="least_load", **common)  # type: ignore[arg-type]
    if system == "vllm-rr":
        return SimConfig(colocated=compare.get("replicas") or 2, prefill_policy="round_robin",
                         **common)  # type: ignore[arg-type]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=Path, required=True, help="a `compare` run's DIR")
    p.add_argument("--cost-profile", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        summary = json.loads((args.real / "summary.json").read_text())
        config = json.loads((args.real / "config.json").read_text())
        cost = make_cost_model("cpu", args.cost_profile)
    except (OSError, ValueError) as e:
        p.error(str(e))
    compare = {**config, **config.get("settings", {})}
    kv_tokens = int(compare.get("kv_cache_gib", 2) * 2**30 / cost.kv_bytes_per_token)
    rows: dict[str, Any] = {}
    for system, real in summary.items():
        records = args.real / f"{system}.records.jsonl"
        sim = sim_config(system, compare, kv_tokens)
        if sim is None or not records.is_file():
            print(f"{system}: not simulated", file=sys.stderr)
            continue
        result = simulate(read_requests(records), sim, cost, system)
        ttft = [r.ttft_s for r in result.records if r.ttft_s is not None]
        jct = [r.jct_s for r in result.records if r.jct_s is not None]
        simulated = {"mean_ttft_ms": 1000 * sum(ttft) / len(ttft),
                     "mean_jct_ms": 1000 * sum(jct) / len(jct)}
        rows[system] = {k: {"real": real[k], "sim": simulated[k],
                            "error": (simulated[k] - real[k]) / real[k]} for k in simulated}
    print(f"{'system':14} {'metric':13} {'real ms':>10} {'sim ms':>10} {'error':>8}  goal")
    for system, row in rows.items():
        for metric, x in row.items():
            ok = "ok" if abs(x["error"]) <= GOAL else "MISS"
            print(f"{system:14} {metric:13} {x['real']:10.0f} {x['sim']:10.0f} "
                  f"{100 * x['error']:+7.1f}%  {ok} (within {100 * GOAL:.0f} %)")
    (args.real / "fidelity.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
