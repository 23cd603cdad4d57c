"""What the KV hand-over costs a long prompt, end to end through real vLLM engines: the
second half of `python -m benchmarks kv`.

For a `--overhead-tokens` prompt (default 2,048) it times TTFT and TTFT plus the first
decode step
- on one colocated engine (both legs on it, no hand-over): the baseline;
- disaggregated: a prefill engine computes the prompt and its first token, then a decode
  engine pulls the KV and makes the second token; once with whole-request pulls and once
  with overlap (the prefill stages each chunk's KV as it completes).
The hand-over's cost is (TTFT + first decode step) disaggregated minus the same
colocated, as a share of the prefill time (the colocated TTFT); the goal with overlap is
at most 5 %. The cost is the median over rounds of each round's difference from that
round's colocated prompt (the difference of the medians is in summary.json too,
`cost_of_medians_ms`). Because a prefill's run-to-run noise is of that order, the time
from the first token to the second is reported beside it ("extra": the hand-over plus
the decode engine taking the request). Engines are `EngineInstance`s in this process
(no Ray, no HTTP), each bound to one core as `shuffleinfer serve` binds them: the two
prefill engines (whole, overlap) share core 0, the whole-mode one doubling as the
colocated engine (so every prompt runs on the same core beside the same idle engine),
the decode engine has core 1, and rounds go round-robin over the three configurations.
Every round sends a prompt of its own (random token ids), so no prefix cache helps.
Figures are medians of `--overhead-rounds` rounds after one untimed warm-up round.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from shuffleinfer.engine.instance import Role

GOAL_SHARE = 0.05
CONFIGS = ("colocated", "disaggregated/whole", "disaggregated/overlap")


def _prompt(tokens: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(1000, 30000) for _ in range(tokens))


def _request(req_id: str, prompt: tuple[int, ...]) -> Any:
    from shuffleinfer.protocol import GenerateRequest, SamplingOptions

    return GenerateRequest(req_id, prompt, SamplingOptions(max_tokens=2, temperature=0.0,
                                                           ignore_eos=True))


async def _colocated_round(engine: Any, req: Any) -> tuple[float, float]:
    started = time.perf_counter()
    times = []
    async for _ in engine.generate(req):
        times.append(time.perf_counter() - started)
    return times[0], times[-1]


async def _disaggregated_round(prefill: Any, decode: Any, req: Any) -> tuple[float, float]:
    started = time.perf_counter()
    result = await prefill.prefill(req)
    ttft = time.perf_counter() - started
    if result.kv_transfer_params is None:
        raise RuntimeError("the prefill leased no KV: nothing was handed over")
    second = ttft
    async for _ in decode.decode(req, result):
        second = time.perf_counter() - started
    return ttft, second


async def start_engine(model_path: str, role: Role, core: int, *, max_model_len: int,
                       chunk_size: int, overlap: bool, transport: str = "auto",
                       lease_s: float = 30.0, kv_cache_gib: int = 2,
                       engine_args: dict[str, Any] | None = None) -> Any:
    """A started `EngineInstance` of `role` in this process, bound to CPU core `core` as
    `shuffleinfer serve` binds instance number `core` (the environment is read when vLLM
    spawns the engine's processes, so it is set just before and put back after)."""
    from shuffleinfer.config import ServeConfig
    from shuffleinfer.engine.instance import EngineInstance, InstanceSpec
    from shuffleinfer.runtime.cluster import engine_dtype
    from shuffleinfer.runtime.placement import cpu_env

    config = ServeConfig.model_validate({"kv_cache_gib": kv_cache_gib})
    spec = InstanceSpec(instance_id=f"{role}-{core}", role=role, model=model_path,
                        chunk_size=chunk_size, dtype=engine_dtype(config, False),
                        max_model_len=max_model_len, kv_overlap=overlap,
                        kv_transport=transport, kv_lease_s=lease_s,
                        engine_args=dict(engine_args or {}))
    saved = dict(os.environ)
    os.environ.update(cpu_env(core, config))
    try:
        engine = EngineInstance(spec)
        await engine.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return engine


async def _measure(model_path: str, tokens: int, rounds: int, chunk_size: int
                   ) -> dict[str, list[tuple[float, float]]]:
    """Rounds interleaved across the configurations (this machine drifts): the two
    prefill engines share core 0, the whole-mode one doubling as the colocated engine;
    the decode engine has core 1."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}

    def start(role: Role, core: int, overlap: bool = False) -> Any:
        return start_engine(model_path, role, core, max_model_len=tokens + 64,
                            chunk_size=chunk_size, overlap=overlap)

    engines: dict[str, Any] = {}
    try:
        engines["decode"] = await start("decode", 1)
        engines["whole"] = await start("prefill", 0)
        engines["overlap"] = await start("prefill", 0, overlap=True)
        # Colocated on a prefill engine: its prompt runs where the disaggregated prompts
        # run (core 0, beside the other, idle prefill engine), so TTFTs compare.
        runs = {"colocated": lambda req: _colocated_round(engines["whole"], req),
                "disaggregated/whole": lambda req: _disaggregated_round(
                    engines["whole"], engines["decode"], req),
                "disaggregated/overlap": lambda req: _disaggregated_round(
                    engines["overlap"], engines["decode"], req)}
        seed = 0
        with tqdm(total=len(CONFIGS) * (rounds + 1), desc="hand-over cost",
                  unit="round") as bar:
            for r in range(rounds + 1):  # round 0 warms the engines up
                for name, run in runs.items():
                    seed += 1
                    took = await run(_request(f"{name}-{r}", _prompt(tokens, seed)))
                    if r:
                        times[name].append(took)
                    bar.update()
    finally:
        for engine in engines.values():
            engine.shutdown()
    return times


def measure_overhead(model_path: str, tokens: int, rounds: int, chunk_size: int
                     ) -> dict[str, Any]:
    """Medians per configuration and each disaggregated mode's cost over colocated."""
    times = asyncio.run(_measure(model_path, tokens, rounds, chunk_size))
    rows: dict[str, Any] = {}
    for name, samples in times.items():
        rows[name] = {"ttft_ms": statistics.median(t for t, _ in samples) * 1e3,
                      "ttft_plus_step_ms": statistics.median(s for _, s in samples) * 1e3}
        rows[name]["after_first_ms"] = statistics.median(s - t for t, s in samples) * 1e3
    prefill_ms = rows["colocated"]["ttft_ms"]
    base = rows["colocated"]
    for name in CONFIGS[1:]:
        # Paired by round: each round's difference from the colocated prompt of the same
        # round, so that the machine's drift between rounds cancels.
        cost = statistics.median(s - b for (_, s), (_, b) in
                                 zip(times[name], times["colocated"], strict=True)) * 1e3
        handover = rows[name]["after_first_ms"] - base["after_first_ms"]
        rows[name] |= {"cost_ms": cost, "cost_share_of_prefill": cost / prefill_ms,
                       "cost_of_medians_ms": rows[name]["ttft_plus_step_ms"]
                       - base["ttft_plus_step_ms"],
                       "handover_ms": handover,
                       "handover_share_of_prefill": handover / prefill_ms}
    return {"tokens": tokens, "rounds": rounds, "chunk_size": chunk_size,
            "prefill_ms": prefill_ms, "goal_share": GOAL_SHARE, "configs": rows}


def overhead_table(summary: dict[str, Any]) -> str:
    """The stdout table of `measure_overhead`."""
    lines = [f"hand-over cost on a {summary['tokens']}-token prompt (chunks of "
             f"{summary['chunk_size']}, medians of {summary['rounds']} rounds; goal with "
             f"overlap: <= {summary['goal_share']:.0%} of the prefill time)",
             f"{'configuration':<22} {'TTFT ms':>8} {'+1 step ms':>10} {'cost ms':>8} "
             f"{'of prefill':>10} {'2nd-1st ms':>10} {'extra ms':>8} {'of prefill':>10}"]
    for name, row in summary["configs"].items():
        cells = ["", "", "", ""]
        verdict = ""
        if "cost_ms" in row:
            cells = [f"{row['cost_ms']:.1f}", f"{row['cost_share_of_prefill']:.1%}",
                     f"{row['handover_ms']:.1f}", f"{row['handover_share_of_prefill']:.1%}"]
            if name.endswith("overlap"):
                verdict = "  ok" if row["cost_share_of_prefill"] <= summary["goal_share"] \
                    else "  MISS"
        lines.append(f"{name:<22} {row['ttft_ms']:>8.1f} {row['ttft_plus_step_ms']:>10.1f} "
                     f"{cells[0]:>8} {cells[1]:>10} {row['after_first_ms']:>10.1f} "
                     f"{cells[2]:>8} {cells[3]:>10}{verdict}")
    lines.append("cost: (TTFT + first decode step) over colocated's; extra: the time from the "
                 "first token to the second over colocated's (the hand-over and the decode "
                 "engine taking the request, without the prefill's run-to-run noise)")
    return "\n".join(lines)
