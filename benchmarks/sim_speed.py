"""How fast the simulator runs: wall time for N requests over a cluster of I instances.

    python -m benchmarks.sim_speed [--requests 1000000] [--instances 512] [--workers 2]
        [--out DIR]

Requests take ShareGPT prompt/output lengths (sampled with replacement, fitted into
OPT-13B's 2,048-token context) and Poisson arrivals at `--rate-per-instance` (default
0.3 requests/s per instance: about 70 % busy for this mix on simulated A100s);
ShuffleInfer runs half prefill, half decode instances with sjf, power_of_two prefill
placement, shuffle decode placement and greedy admission, and the DistServe A100 cost
model. (least_load prefill placement looks at every prefill instance per request: about
50 us per request over 256 candidates here, which alone nearly fills the goal's budget;
`--prefill-policy least_load` measures it.) `--workers 2` (the default) runs the
prefill side in a second process (`shuffleinfer/sim/split.py`: the same result, request
for request), 1 all in one. Prints the wall time, simulated requests per
wall second and the ratio to the goal (1,000,000 requests over 512 instances in 60 s);
`--out` also writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

import shuffleinfer.sim
from benchmarks.records import TraceRequest
from benchmarks.replay import DEFAULT_DATA_DIR
from benchmarks.traces import load_trace
from shuffleinfer.sim import compiled

GOAL_REQUESTS, GOAL_INSTANCES, GOAL_S = 1_000_000, 512, 60.0


def workload(n: int, rate: float, seed: int, data_dir: Path) -> list[TraceRequest]:
    lengths = load_trace("sharegpt", data_dir=data_dir, max_model_len=2048).requests
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        r = rng.choice(lengths)
        out.append(TraceRequest(t, r.prompt_tokens, r.output_tokens))
        t += rng.expovariate(rate)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_speed", description=__doc__)
    p.add_argument("--requests", type=int, default=GOAL_REQUESTS)
    p.add_argument("--instances", type=int, default=GOAL_INSTANCES)
    p.add_argument("--rate-per-instance", type=float, default=0.3)
    p.add_argument("--prefill-policy", default="power_of_two")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, choices=(1, 2), default=2,
                   help="processes: 2 runs the prefill side beside the decode side")
    p.add_argument("--sources", action="store_true",
                   help="run the simulator's Python sources, not their mypyc build (by "
                   "default built first if missing: about 15 s, not timed)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.requests < 1 or args.instances < 2 or args.rate_per_instance <= 0:
        p.error("need --requests >= 1, --instances >= 2, --rate-per-instance > 0")
    if args.sources:
        os.environ[compiled.ENV] = "0"
    else:
        print("compiling the simulator (once per version of its sources) ...",
              file=sys.stderr, flush=True)
        try:
            compiled.build()
        except RuntimeError as e:
            print(f"{e}\nrunning the sources instead", file=sys.stderr)
    compiled.activate(shuffleinfer.sim.__path__)
    # Imported only now: the compiled modules load if active.
    from shuffleinfer.sim.cost import A100_OPT13B
    from shuffleinfer.sim.simulator import SimConfig, simulate
    from shuffleinfer.sim.split import simulate_in_two

    code = "compiled" if compiled.in_use() else "sources"
    reqs = workload(args.requests, args.rate_per_instance * args.instances, args.seed,
                    args.data_dir)
    half = args.instances // 2
    config = SimConfig(num_prefill=half, num_decode=args.instances - half,
                       prefill_policy=args.prefill_policy, kv_capacity_tokens=60_000,
                       max_tokens=2048, seed=args.seed)
    started = time.perf_counter()
    with tqdm(total=len(reqs), desc="simulating", unit="req", mininterval=1.0) as bar:
        run = simulate_in_two if args.workers == 2 else simulate
        result = run(reqs, config, A100_OPT13B, progress=bar.update)
    wall = time.perf_counter() - started
    per_s = len(reqs) / wall
    # The goal scaled to this run's size (cost grows with requests x candidates per placement).
    goal_wall = GOAL_S * len(reqs) / GOAL_REQUESTS
    summary = {"requests": len(reqs), "instances": args.instances,
               "prefill_policy": args.prefill_policy, "workers": args.workers,
               "code": code,
               "wall_s": wall,
               "simulated_s": result.duration_s, "requests_per_wall_s": per_s,
               "completed": sum(r.ok for r in result.records),
               "goal": f"{GOAL_REQUESTS} requests over {GOAL_INSTANCES} instances in "
                       f"{GOAL_S:.0f} s", "wall_vs_goal": wall / goal_wall}
    print(f"{len(reqs):,} requests over {args.instances} instances, {args.workers} "
          f"process{'es' if args.workers > 1 else ''} ({code}): {wall:.1f} s wall "
          f"({per_s:,.0f} requests/s), {result.duration_s:,.0f} s simulated; "
          f"{summary['wall_vs_goal']:.2f}x the goal's time for this many requests")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
