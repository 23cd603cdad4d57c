"""`shuffleinfer calibrate`: measure prefill throughput against batched tokens on the real
engine and save the saturation point as the model's chunk size on this machine.

    shuffleinfer calibrate [--model M] [--dtype auto|bfloat16|float16|float32]
        [--cpus-per-instance N] [--kv-cache-gib G] [--cache-dir DIR]
        [--sizes 32,64,...,2048] [--repeats R] [--threshold F] [--seed S] [--out FILE.json]
        [--engine-arg KEY=VALUE ...]
    shuffleinfer calibrate --profile [--profile-quick] [--repeats R] [--out FILE.json] ...

The engine is set up as one serving instance: the same model resolution, dtype (`auto`:
float32 on CPU), cores and KV cache (`cpu_env` of instance 0), chunked prefill, and the
same `--engine-arg` pass-through (serve with `enforce_eager`, calibrate with it). Prefix
caching is off and every run draws fresh random token ids, so no run reuses another's KV.
Each size B is one prompt of B tokens with `max_tokens=1`, one engine step with
`max_num_batched_tokens` at the largest size (see `prefill_timer.py`). One untimed run
per size comes first (oneDNN builds its kernels per shape), then `--repeats` timed runs;
the median counts.

`--profile` runs instead of that sweep: it times prefill and decode steps of many shapes
and fits the simulator's `cpu` cost model (see `profile_steps.py`).

Exit codes: 0 done, 1 the run failed (preparing the model, writing the results),
2 usage error (the message names the flag).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from shuffleinfer.cli_args import engine_arg, owned_engine_args, positive_int
from shuffleinfer.config import DEFAULT_MODEL_NAME, ServeConfig
from shuffleinfer.engine.calibration import (
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    calibration_path,
    format_table,
    make_calibration,
    write_calibration,
    write_plot,
)
from shuffleinfer.engine.prefill_timer import PrefillTimer, measure

DEFAULT_SIZES = (32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_THRESHOLD = 0.9
CALIBRATE_OWNS = ("enable_prefix_caching", "enable_chunked_prefill", "seed")
"""Engine args calibrate sets itself, besides those serve owns (see `ServeConfig`)."""
_RUN_FAILED, _USAGE = 1, 2


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    bad = [s for s in sizes if not MIN_CHUNK_SIZE <= s <= MAX_CHUNK_SIZE]
    if bad:  # a size serve would refuse as --chunk-size is not worth measuring
        raise argparse.ArgumentTypeError(
            f"sizes must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {bad}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"sizes repeat: {text!r}")
    return tuple(sorted(sizes))


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `calibrate` command; its namespace's `handler` returns the exit code."""
    defaults = ServeConfig.model_validate({})
    p = subparsers.add_parser(
        "calibrate", help="measure the prefill saturation point; serve's default chunk size",
        description="Time one prefill step of each size on the real engine, set up as one "
        "serving instance, and save the smallest size reaching --threshold of the best "
        "throughput; `serve` runs it as the chunk size unless --chunk-size is given.")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME,
                   help=f"as for serve (default: {DEFAULT_MODEL_NAME})")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                   default="auto", help="as for serve; auto is float32 on CPU (default: auto)")
    p.add_argument("--cpus-per-instance", type=positive_int, default=defaults.cpus_per_instance,
                   help="cores of one serving instance to measure on "
                   f"(default: {defaults.cpus_per_instance})")
    p.add_argument("--kv-cache-gib", type=positive_int, default=defaults.kv_cache_gib,
                   help=f"KV cache on CPU, GiB (default: {defaults.kv_cache_gib})")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="models folder, as for serve (default ~/.cache/shuffleinfer/models)")
    p.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES,
                   help="batched prompt tokens per step to measure, comma-separated "
                   f"(default: {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per size; the median counts (default: 3)")
    p.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                   help="the chunk size is the smallest size at this fraction of the best "
                   "throughput, in (0, 1] (default: 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--engine-arg", dest="engine_args", action="append", type=engine_arg,
                   default=[], metavar="KEY=VALUE",
                   help="extra vLLM engine argument, as for serve (repeatable)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file to write, a PNG plot beside it (default: the file serve "
                   "reads, <cache dir>/calibration/<model>.json; with --profile, the one "
                   "the simulator's cost model `cpu` reads, <cache dir>/calibration/"
                   "cpu-cost-model.json)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the chunk-size sweep, time prefill and decode steps of "
                   "many shapes (--repeats runs of each prefill), fit the simulator's `cpu` "
                   "cost model and save it (~5 min)")
    p.add_argument("--profile-quick", action="store_true",
                   help="with --profile: a tiny plan, seconds long; too few steps to trust")
    p.set_defaults(handler=run_calibrate)
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    """Handle `calibrate`: measure, print the table, write the JSON and the plot."""
    engine_args = dict(args.engine_args)
    if error := owned_engine_args("calibrate", engine_args, CALIBRATE_OWNS):
        return _usage_error(error)
    if args.profile_quick and not args.profile:
        return _usage_error("--profile-quick needs --profile")
    if args.profile and (args.sizes != DEFAULT_SIZES or args.threshold != DEFAULT_THRESHOLD):
        flag = "--sizes" if args.sizes != DEFAULT_SIZES else "--threshold"
        return _usage_error(f"{flag} is for the chunk-size sweep; --profile has its own plan")
    try:
        config = ServeConfig.model_validate({
            "model": args.model, "dtype": args.dtype, "cache_dir": args.cache_dir,
            "cpus_per_instance": args.cpus_per_instance, "kv_cache_gib": args.kv_cache_gib,
            "engine_args": engine_args})
    except ValidationError as e:  # argparse checked the other flags already
        return _usage_error("; ".join(f"invalid --engine-arg: {err['msg']}"
                                      for err in e.errors()))
    # vLLM logs to stdout unless told otherwise; stdout is for the table. Set before
    # vLLM is imported (its logger reads it once) and inherited by its engine process.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # Imported only now: torch and vLLM take seconds, and a usage error needs neither.
    import torch

    from shuffleinfer.model import ModelPrepareError, resolve_model
    from shuffleinfer.predictor.label import resolve_dtype
    from shuffleinfer.runtime.placement import cpu_env

    out = args.out or calibration_path(config.model, config.cache_dir)
    try:
        model_path = resolve_model(config.model, config.cache_dir)
    except ModelPrepareError as e:
        print(f"shuffleinfer calibrate: error: {e}", file=sys.stderr)
        return _RUN_FAILED
    dtype = resolve_dtype(config.dtype)
    if not torch.cuda.is_available():  # bound to its cores, as serve binds instance 0's
        os.environ.update(cpu_env(0, config))
    if args.profile:
        from shuffleinfer.engine.profile_steps import run_profile
        from shuffleinfer.sim.cost import default_profile_path

        return run_profile(config, model_path, dtype, quick=args.profile_quick,
                           repeats=args.repeats, seed=args.seed,
                           out=args.out or default_profile_path(config.cache_dir))
    timer = PrefillTimer(model_path, dtype=dtype, max_num_batched_tokens=max(args.sizes),
                         seed=args.seed, engine_args=config.engine_args)
    seconds = measure(timer, args.sizes, args.repeats)
    calibration = make_calibration(config.model, dtype, config.cpus_per_instance, args.sizes,
                                   seconds, args.threshold, args.repeats)
    print(format_table(calibration), flush=True)
    try:
        write_calibration(out, calibration)
        write_plot(calibration, out.with_suffix(".png"))
    except OSError as e:
        print(f"shuffleinfer calibrate: error: {e}", file=sys.stderr)
        return _RUN_FAILED
    print(f"saved {out} and {out.with_suffix('.png')}", flush=True)
    return 0


def _usage_error(message: str) -> int:
    print(f"shuffleinfer calibrate: error: {message}", file=sys.stderr)
    return _USAGE
