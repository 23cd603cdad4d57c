"""`python -m benchmarks kv --out DIR`: KV hand-over throughput of each CPU transport,
next to what this machine allows, measured side by side in one run.

For each prompt size (`--tokens`, default 128, 1k and 4k tokens) a prefill worker (a real
`ConnectorWorker` with its KV server, in a child process) leases blocks shaped like the
default model's cache (30 layers, 3 KV heads x 64 dims, float32, vLLM's CPU block size
128) and this process pulls them through each transport, round by round, checking the
bytes every time. Beside each transport the same number of bytes is moved by the
primitive it is built on, the machine's limit for it:

- shm against one thread's in-process memcpy of a source out of cache (each side of the
  transport copies with one thread, as an engine's worker has one core): shm copies once
  on each side, so the goal is at least 0.5 of memcpy. The memcpy is timed as a pull
  copies: its source flushed out of the caches first (a pull's source is memory the
  prefill wrote on another core, with a forward pass's weights streamed through since)
  and its destination just zeroed (as the benchmark zeroes the decode's blocks before
  each pull). It is timed in a burst before the pulls and one after, and the faster
  burst is the limit (a slow spell of the machine during one burst once printed it at
  2.5 GB/s instead of about 10, which would flatter shm). summary.json also has, for
  reference, memcpy of the same two buffers round after round (`memcpy_cached_gbps`,
  `ratio_cached`; printed under the table): at 128 tokens (5.6 MiB) they stay in cache,
  which no hand-over's source is, so that copy ran about twice as fast as the cold one
  here; at 1k tokens and more (45 MiB and up, more than the caches hold) the two came
  within about 15 % of each other. And torch's copy across all cores
  (`memcpy_all_cores_gbps`);
- tcp against a raw loopback socket stream from another process (`sendall` of one
  buffer, `recv_into` one buffer), timed once in every round right after the pulls (a
  noisy spell slows both): the goal is at least 0.7 of it.

Each transport runs in both modes: whole (the prefill's blocks are read out of its cache
when the decode pulls; shm maps the prefill's cache, kept in shared memory, and copies
once) and overlap (they were staged while the prefill ran; the pull reads the staged
copy: shm maps the staging segment, one copy on the decode side).

Then, unless `--skip-overhead`, what the hand-over costs a 2k-token prompt through real
vLLM engines, disaggregated in both modes against one colocated engine
(`kv_overhead.py`).

Prints tables, writes DIR/summary.json (per transport, mode and size: `gbps`,
`limit_gbps`, `ratio`, milliseconds, bytes; and `overhead`) and DIR/kv.png. Throughput
figures are medians of timed rounds after one untimed warm-up round (where shm allocates
the segments it reuses): `--rounds`, by default enough to move about 100 MiB, between 5
and 25 (a one-block hand-over takes about a millisecond, so a few noisy ones would sway
a median of 5).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from shuffleinfer.cli_args import positive_int
from shuffleinfer.model.registry import DEFAULT_MODEL

if TYPE_CHECKING:  # torch is imported only when the benchmark runs
    from shuffleinfer.kv.bench import CacheShape

DEFAULT_TOKENS = (128, 1024, 4096)
# What each transport is held against, and the share of it that is the goal.
LIMITS = {"shm": ("cold memcpy", 0.5), "tcp": ("raw socket", 0.7)}


Results = dict[str, dict[str, dict[str, dict[str, Any]]]]
"""transport -> mode -> prompt size (str) -> row."""


def default_rounds(nbytes: int) -> int:
    """Timed rounds for a hand-over of `nbytes`: enough to move about 100 MiB, 5 to 25."""
    return max(5, min(25, math.ceil((100 << 20) / nbytes)))


def measure(tokens: int, rounds: int | None, shape: CacheShape
            ) -> dict[str, dict[str, dict[str, Any]]]:
    """Per transport and mode: throughput of handing `tokens` tokens' blocks over, and
    its limit's, over `rounds` timed rounds (None: `default_rounds`)."""
    from shuffleinfer.kv.bench import MODES, SocketLimit, memcpy_seconds, run_blocks

    num_blocks = math.ceil(tokens / shape.block_size)
    nbytes = num_blocks * shape.block_bytes
    rounds = rounds or default_rounds(nbytes)
    socket_limit = SocketLimit(nbytes)
    # (run_blocks' round 0 is not timed)
    cold_before = memcpy_seconds(nbytes, rounds, cold_source=True)
    try:
        seconds = run_blocks(num_blocks, rounds, shape, each_round=socket_limit.round)
    finally:
        socket_limit.close()
    cold_after = memcpy_seconds(nbytes, rounds, cold_source=True)
    faster = min((cold_before, cold_after), key=lambda t: statistics.median(t[1:]))
    limit_seconds = {"shm": faster, "tcp": socket_limit.seconds}
    all_cores_s = statistics.median(memcpy_seconds(nbytes, rounds, all_cores=True)[1:])
    cached_s = min(statistics.median(memcpy_seconds(nbytes, rounds)[1:]) for _ in range(2))
    rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in LIMITS}
    for name, (limit, goal) in LIMITS.items():
        limit_took = statistics.median(limit_seconds[name][1:])
        for mode in MODES:
            took = statistics.median(seconds[mode][name][1:])
            rows[name][mode] = {
                "tokens": tokens, "blocks": num_blocks, "bytes": nbytes,
                "ms": took * 1e3, "gbps": nbytes / took / 1e9,
                "limit": limit, "limit_ms": limit_took * 1e3,
                "limit_gbps": nbytes / limit_took / 1e9, "ratio": limit_took / took,
                "goal_ratio": goal, "first_ms": seconds[mode][name][0] * 1e3,
                "rounds": rounds,
            }
            if name == "shm":
                rows[name][mode] |= {"memcpy_all_cores_gbps": nbytes / all_cores_s / 1e9,
                                     "memcpy_cached_gbps": nbytes / cached_s / 1e9,
                                     "ratio_cached": cached_s / took}
    return rows


def table(results: Results) -> str:
    """The stdout table: one line per transport, mode and size."""
    lines = [f"{'transport':<9} {'mode':<7} {'tokens':>6} {'rounds':>6} {'MiB':>7} {'ms':>8} "
             f"{'GB/s':>6}   {'limit':<11} {'GB/s':>6} {'ratio':>6} {'goal':>5}"]
    for name, modes in results.items():
        for mode, sizes in modes.items():
            for row in sizes.values():
                ok = "ok" if row["ratio"] >= row["goal_ratio"] else "MISS"
                lines.append(
                    f"{name:<9} {mode:<7} {row['tokens']:>6} {row.get('rounds', ''):>6} "
                    f"{row['bytes'] / 2**20:>7.1f} "
                    f"{row['ms']:>8.2f} {row['gbps']:>6.2f}   {row['limit']:<11} "
                    f"{row['limit_gbps']:>6.2f} {row['ratio']:>6.2f} "
                    f"{'>=' + format(row['goal_ratio'], '.1f'):>5} {ok}")
    cached = [f"{mode} {row['tokens']}: {row['memcpy_cached_gbps']:.2f} GB/s, ratio "
              f"{row['ratio_cached']:.2f}" for mode, sizes in results.get("shm", {}).items()
              for row in sizes.values() if "ratio_cached" in row]
    if cached:
        lines.append("shm against memcpy of buffers kept in cache (reference): "
                     + "; ".join(cached))
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    """Grouped bars per size: each transport's modes beside its limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, modes) in zip(axes[0], results.items(), strict=True):
        rows = list(next(iter(modes.values())).values())
        x = np.arange(len(rows))
        width = 0.8 / (len(modes) + 1)
        for k, (mode, sizes) in enumerate(modes.items()):
            ax.bar(x + (k - len(modes) / 2) * width, [r["gbps"] for r in sizes.values()],
                   width, label=f"{name} ({mode})")
        ax.bar(x + len(modes) / 2 * width, [r["limit_gbps"] for r in rows], width,
               label=rows[0]["limit"], color="grey")
        ax.set_xticks(x, [f"{r['tokens']} tok" for r in rows])
        ax.set_ylabel("GB/s")
        ax.set_title(f"{name} vs {rows[0]['limit']}")
        ax.legend()
    fig.suptitle("KV hand-over throughput (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_kv(args: argparse.Namespace) -> int:
    """The `kv` subcommand: measure, print, write summary.json and kv.png."""
    from shuffleinfer.kv.bench import CacheShape

    shape = CacheShape(block_size=args.block_size)
    args.out.mkdir(parents=True, exist_ok=True)
    results: Results = {name: {} for name in LIMITS}
    for tokens in tqdm(args.tokens, desc="prompt sizes", unit="size"):
        for name, modes in measure(tokens, args.rounds, shape).items():
            for mode, row in modes.items():
                results[name].setdefault(mode, {})[str(tokens)] = row
    print(f"KV hand-over: blocks of {shape.num_layers} layers x [{shape.kv_heads}, "
          f"{shape.block_size}, {2 * shape.head_size}] "
          f"{str(shape.dtype).removeprefix('torch.')} ({shape.block_bytes / 2**20:.2f} MiB "
          f"each), medians of timed rounds")
    print(table(results))
    summary: dict[str, Any] = {"block_size": shape.block_size,
                               "block_bytes": shape.block_bytes, "rounds": args.rounds,
                               "transports": results}
    plot(results, args.out / "kv.png")
    if not args.skip_overhead:
        from benchmarks.kv_overhead import measure_overhead, overhead_table
        from shuffleinfer.model import resolve_model

        summary["overhead"] = measure_overhead(resolve_model(args.model), args.overhead_tokens,
                                               args.overhead_rounds, args.chunk_size)
        print(overhead_table(summary["overhead"]))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'kv.png'}")
    return 0


def add_kv_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `kv` subcommand's flags."""
    p = subparsers.add_parser("kv", help="KV hand-over throughput vs this machine's limits",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--tokens", type=_sizes, default=DEFAULT_TOKENS, metavar="N[,N...]",
                   help="prompt sizes in tokens (default 128,1024,4096)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="timed rounds per measurement (default: enough to move about "
                        "100 MiB, 5 to 25)")
    p.add_argument("--block-size", type=positive_int, default=128, help="tokens per KV block")
    p.add_argument("--skip-overhead", action="store_true",
                   help="only the throughput part (no engines)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model of the overhead part")
    p.add_argument("--overhead-tokens", type=positive_int, default=2048,
                   help="prompt tokens of the overhead part")
    p.add_argument("--overhead-rounds", type=positive_int, default=9,
                   help="timed rounds per configuration of the overhead part (a "
                        "prefill's run-to-run noise is a few %%: 5 rounds once showed "
                        "overlap at +5.3 %%, 9 at +1.6 %%)")
    p.add_argument("--chunk-size", type=positive_int, default=512,
                   help="prefill chunk of the overhead part's engines")
    return p


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1: {text!r}")
    return sizes
