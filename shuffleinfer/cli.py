"""The `shuffleinfer` command: `serve`, `model prepare`, `predictor label | eval` and
`calibrate`.

Every `serve` option is a `ServeConfig` field; a YAML file given with `--config` supplies
defaults and flags override it. Unknown flags and invalid values stop the command before
anything starts, with a message naming the option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shuffleinfer.cli_args import boolean, engine_arg, json_object
from shuffleinfer.config import ServeConfig, load_config
from shuffleinfer.engine.calibrate import add_calibrate_parser
from shuffleinfer.model.cli import add_model_parser
from shuffleinfer.predictor.cli import add_predictor_parser
from shuffleinfer.sim.cli import add_simulate_parser

_SERVE_FLAGS: dict[str, Callable[[str], Any]] = {
    "model": str, "served_model_name": str, "host": str, "port": int,
    "num_prefill": int, "num_decode": int, "chunk_size": int, "dtype": str,
    "max_model_len": int, "kv_cache_gib": int, "cpus_per_instance": int,
    "kv_host": str, "kv_lease_s": float, "address": str, "api_key": str, "admin_token": str,
    "prefill_policy": str, "decode_policy": str, "cache_dir": Path, "predictor": str,
    "predictor_state": Path, "predictor_push_s": float, "kv_transport": str,
    "kv_overlap": boolean,
    "prefill_resources": json_object, "decode_resources": json_object,
    "prefill_node_labels": json_object, "decode_node_labels": json_object,
    "gpus_per_instance": int, "max_restarts": int,
    "prefill_order": str, "sched_window": int, "admission": str,
    "heavy_threshold_tokens": int, "monitor_interval_ms": int, "flip_policy": str,
    "flip_idle_s": float, "flip_options": json_object, "max_num_requests": int,
    "retry_after_s": int,
}


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """`serve` takes one flag per ServeConfig field plus --config and --engine-arg."""
    p = subparsers.add_parser("serve", help="serve a model disaggregated (OpenAI-compatible)",
                              description="Start (or join) a Ray cluster, launch prefill and "
                              "decode instances, and serve the OpenAI API.")
    p.add_argument("--config", type=Path, help="YAML file of serve options")
    for name, kind in _SERVE_FLAGS.items():
        field = ServeConfig.model_fields[name]
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       help=f"{field.description} (default: {field.default})")
    p.add_argument("--engine-arg", dest="engine_args", action="append", type=engine_arg,
                   default=None, metavar="KEY=VALUE",
                   help="extra vLLM engine argument (repeatable; VALUE parsed as JSON)")
    p.set_defaults(handler=_run_serve)


def _flag_name(field: str) -> str:
    if field == "engine_args" or field.startswith("engine_args."):
        return "--engine-arg"
    return f"--{field.replace('_', '-')}" if field in _SERVE_FLAGS else field


def _run_serve(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in _SERVE_FLAGS
                 if getattr(args, name) is not None}
    if args.engine_args:
        overrides["engine_args"] = dict(args.engine_args)
    try:
        config = load_config(args.config, overrides)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            print(f"shuffleinfer serve: error: invalid {_flag_name(where)}: {err['msg']}",
                  file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"shuffleinfer serve: error: {e}", file=sys.stderr)
        return 2
    from shuffleinfer.serve import serve

    return serve(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shuffleinfer` console script."""
    parser = argparse.ArgumentParser(prog="shuffleinfer", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    add_model_parser(subparsers)
    add_predictor_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_simulate_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
