"""How close the simulator comes to real runs on this machine.

    python -m benchmarks compare --systems shuffleinfer,vllm-rr --trace mixed --rate 0.25 \\
        --max-requests 40 --max-model-len 1024 --seed 1 --log-steps --out runs/calib
    python -m benchmarks compare --systems shuffleinfer,vllm-rr --trace mixed --rate 0.25 \\
        --max-requests 40 --max-model-len 1024 --seed 0 --out runs/real
    python -m benchmarks.sim_fidelity --real runs/real --served runs/calib

Replays the very requests of a `compare` run (arrival, prompt and output lengths from its
records) in the simulator with the real systems' settings: ShuffleInfer as its prefill
and decode instances (one core each), `vllm-rr` as that many colocated single-core
instances placed in turn, first come first served. A colocated `vllm` server on several
cores is not simulated.

Step latencies come, per system, from a cost model fitted on the steps its engines ran in
another run (`--served`, made with `--log-steps`: `shuffleinfer.sim.served`), so the
replayed run is not the one the model was fitted on; without `--served`, from the `cpu`
profile (`shuffleinfer calibrate --profile`: one engine alone on an idle core, which a
served engine on this machine is not). Prints each model's fit, then per system real and
simulated mean TTFT and JCT and their relative error against the goal (within 15 %);
writes DIR/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.records import TraceRequest
from shuffleinfer.sim.cost import LinearCost, make_cost_model
from shuffleinfer.sim.served import fit_overheads, fit_served, read_run_steps
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
                         prefill_order="fcfs", **common)  # type: ignore[arg-type]
    return None


def served_cost(run: Path, system: str, profile: LinearCost,
                kv_tokens: int) -> tuple[LinearCost, float]:
    """`system`'s step costs fitted on the steps its engines logged in `run`, and the
    overheads the logs leave out (per step, per request) fitted on `run`'s requests."""
    logs = sorted((run / "logs").glob(f"{system}*.log"))
    steps = read_run_steps(logs, kv_tokens)
    try:
        model, fit = fit_served(f"served-{system}", steps,
                                kv_bytes_per_token=profile.kv_bytes_per_token,
                                link_bytes_per_s=profile.link_bytes_per_s,
                                source=f"steps logged in {run} by {system}")
        summary = json.loads((run / "summary.json").read_text())[system]
        requests = read_requests(run / f"{system}.records.jsonl")
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"{run}: no usable steps or records of {system} ({e}); was it run "
                         "with --log-steps?") from None
    config = sim_config(system, run_settings(run), kv_tokens)
    assert config is not None  # only simulated systems get here
    with_overheads, request_s = fit_overheads(model, config, requests,
                                              summary["mean_ttft_ms"] / 1000,
                                              summary["mean_jct_ms"] / 1000)
    step_s = with_overheads.decode_base_s - model.decode_base_s
    print(f"{system}: fitted on {fit.num_prefill_steps} prompt and {fit.num_decode_steps} "
          f"decode-only steps of {run}, mean error {100 * fit.prefill_mean_rel_error:.0f} % "
          f"and {100 * fit.decode_mean_rel_error:.0f} %: prefill "
          f"{1e3 * model.prefill_base_s:.1f} ms + {1e3 * model.prefill_per_token_s:.3f} "
          f"ms/token; decode {1e3 * model.decode_base_s:.1f} ms + "
          f"{1e3 * model.decode_per_req_s:.2f} ms/request + "
          f"{1e6 * model.decode_per_ctx_s:.2f} us/context token; outside the steps: "
          f"{1e3 * step_s:.0f} ms per step, {1e3 * request_s:.0f} ms per request")
    return with_overheads, request_s


def run_settings(run: Path) -> dict[str, Any]:
    config = json.loads((run / "config.json").read_text())
    return {**config, **config.get("settings", {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=Path, required=True, help="a `compare` run's DIR")
    p.add_argument("--served", type=Path, default=None, metavar="DIR",
                   help="a `compare --log-steps` run to fit each system's step costs on")
    p.add_argument("--cost-profile", type=Path, default=None,
                   help="the `cpu` profile to use without --served (and for KV sizes)")
    args = p.parse_args(argv)
    try:
        summary = json.loads((args.real / "summary.json").read_text())
        compare = run_settings(args.real)
        cost = make_cost_model("cpu", args.cost_profile)
    except (OSError, ValueError) as e:
        p.error(str(e))
    kv_tokens = int(compare.get("kv_cache_gib", 2) * 2**30 / cost.kv_bytes_per_token)
    rows: dict[str, Any] = {}
    for system, real in summary.items():
        records = args.real / f"{system}.records.jsonl"
        sim = sim_config(system, compare, kv_tokens)
        if sim is None or not records.is_file():
            print(f"{system}: not simulated", file=sys.stderr)
            continue
        model, request_s = (cost, 0.0) if args.served is None else served_cost(
            args.served, system, cost, kv_tokens)
        result = simulate(read_requests(records), replace(sim, request_overhead_s=request_s),
                          model, system)
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
