"""`shuffleinfer predictor label | eval`.

    shuffleinfer predictor label [--data FILE] --out LABELS [--limit N] [--max-tokens T]
        [--model NAME] [--seed S] [--max-prompt-tokens P] [--max-in-flight M]
        [--dtype auto|bfloat16|float16|float32]
    shuffleinfer predictor eval [--data FILE] --labels LABELS [--json] [--target greedy|sampled]
        [--bucket-widths 50,100,200] [--max-tokens T] [--test-percent P] [--warmup W]
        [--bucket-rule most_likely|holding_point] [--point-rule regression|distribution_median]

Exit codes: 0 done, 1 the run failed, 2 usage error (bad option or input file).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from shuffleinfer.cli_args import engine_arg, owned_engine_args, positive_int
from shuffleinfer.predictor.data import default_prompts_file

_RUN_FAILED, _USAGE = 1, 2


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"bucket widths must be >= 1, got {text!r}")
    return widths


def add_predictor_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `predictor` command with its `label` and `eval` subcommands."""
    parser = subparsers.add_parser("predictor", help="label data for and evaluate the "
                                   "output-length predictor")
    sub = parser.add_subparsers(dest="predictor_command", required=True)
    data_help = f"prompts file, mixed-task JSONL(.gz) format (default: {default_prompts_file()})"

    label = sub.add_parser("label", help="record the served model's output lengths",
                           description="Run the model through vLLM over the prompts and "
                           "append their greedy and sampled (T=0.7) output lengths to LABELS; "
                           "resumable: ids already in LABELS are skipped.")
    label.add_argument("--data", type=Path, default=None, help=data_help)
    label.add_argument("--out", type=Path, required=True, help="labels CSV to append to")
    label.add_argument("--limit", type=positive_int, default=None,
                       help="label N distinct prompts, an equal share per task (seeded)")
    label.add_argument("--max-tokens", type=positive_int, default=512,
                       help="output limit of each generation (default: 512)")
    label.add_argument("--max-prompt-tokens", type=positive_int, default=2048,
                       help="longer prompts are recorded as skipped (default: 2048)")
    label.add_argument("--model", default=None,
                       help="embedded model name, HF id or path (default: the default model)")
    label.add_argument("--seed", type=int, default=0,
                       help="seed of the prompt choice and of the sampling (default: 0)")
    label.add_argument("--max-in-flight", type=positive_int, default=64,
                       help="prompts running in the engine at once, two generations each "
                       "(default: 64)")
    label.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                       default="auto", help="engine dtype; label with the dtype you serve "
                       "(outputs differ between dtypes). auto, like `serve`: float32 on CPU, "
                       "the model's own dtype on GPU (default: auto)")
    label.add_argument("--engine-arg", dest="engine_args", action="append", type=engine_arg,
                       default=[], metavar="KEY=VALUE",
                       help="extra vLLM engine argument, as for serve (repeatable; e.g. "
                       "enforce_eager=true starts sooner on CPU)")
    label.set_defaults(handler=run_label)

    ev = sub.add_parser("eval", help="evaluate the predictor against baselines",
                        description="Split by prompt_id, fit, and compare the predictor with "
                        "a constant median, a line in prompt length and a per-task median "
                        "(oracle task), held out and prequentially.")
    ev.add_argument("--data", type=Path, default=None, help=data_help)
    ev.add_argument("--labels", type=Path, required=True, help="labels CSV")
    ev.add_argument("--target", choices=("greedy", "sampled"), default="greedy",
                    help="which label column to predict (default: greedy)")
    ev.add_argument("--bucket-widths", type=_widths, default=(50, 100, 200),
                    help="bucket widths, the first one primary (default: 50,100,200)")
    ev.add_argument("--max-tokens", type=positive_int, default=None,
                    help="max_tokens of the labelling run (default: inferred from the labels)")
    ev.add_argument("--test-percent", type=int, default=25,
                    help="share of prompt_ids held out for testing (default: 25)")
    ev.add_argument("--warmup", type=int, default=500,
                    help="prequential figures start after this many requests (default: 500)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    ev.add_argument("--bucket-rule", choices=("most_likely", "holding_point"),
                    default="most_likely", help="the predictor's bucket_rule (default: "
                    "most_likely)")
    ev.add_argument("--point-rule", choices=("regression", "distribution_median"),
                    default="regression", help="the predictor's point_rule (default: "
                    "regression)")
    ev.add_argument("--json", action="store_true",
                    help="also print all figures as one JSON object on the last line")
    ev.set_defaults(handler=run_eval)
    return parser


def run_label(args: argparse.Namespace) -> int:
    """Handle `predictor label`; return the exit code."""
    from shuffleinfer.model import DEFAULT_MODEL, ModelPrepareError, resolve_model
    from shuffleinfer.predictor.data import read_prompts, select_prompts
    from shuffleinfer.predictor.label import (
        LABEL_OWNS,
        VllmLabelEngine,
        label_prompts,
        set_cpu_engine_env,
    )
    from shuffleinfer.predictor.labels import describe, read_labels

    if error := owned_engine_args("label", (key for key, _ in args.engine_args), LABEL_OWNS):
        print(f"shuffleinfer predictor label: error: {error}", file=sys.stderr)
        return _USAGE

    def make_engine() -> VllmLabelEngine:
        set_cpu_engine_env()
        return VllmLabelEngine(resolve_model(args.model or DEFAULT_MODEL),
                               max_tokens=args.max_tokens,
                               max_prompt_tokens=args.max_prompt_tokens,
                               max_in_flight=args.max_in_flight, dtype=args.dtype,
                               seed=args.seed, engine_args=dict(args.engine_args))

    try:
        records = select_prompts(read_prompts(args.data or default_prompts_file()),
                                 args.limit, args.seed)
        summary = label_prompts(records, args.out, make_engine,
                                max_prompt_tokens=args.max_prompt_tokens)
    except ModelPrepareError as e:
        print(f"shuffleinfer predictor label: error: {e}", file=sys.stderr)
        return _RUN_FAILED
    except (OSError, ValueError) as e:
        print(f"shuffleinfer predictor label: error: {e}", file=sys.stderr)
        return _USAGE
    print(f"{summary.num_selected} prompts selected, {summary.num_already_labelled} already "
          f"labelled, {summary.num_labelled} labelled now, {summary.num_skipped} skipped "
          f"(longer than {args.max_prompt_tokens} tokens) in {summary.labelling_s:.0f} s "
          f"({summary.prompts_per_s:.2f} prompts/s); labels in {args.out}", file=sys.stderr)
    rows = read_labels(args.out) if args.out.is_file() else []
    for target in ("greedy", "sampled"):
        print(describe(rows, target), file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Handle `predictor eval`; return the exit code."""
    from shuffleinfer.predictor.config import NgramPredictorConfig
    from shuffleinfer.predictor.data import read_prompts
    from shuffleinfer.predictor.evaluate import build_examples, evaluate
    from shuffleinfer.predictor.labels import read_labels
    from shuffleinfer.predictor.report import goals, render_table

    try:
        labels = read_labels(args.labels)
        wanted = {row.id for row in labels}
        prompts = {r.id: r for r in read_prompts(args.data or default_prompts_file())
                   if r.id in wanted}
        examples, max_tokens = build_examples(labels, prompts, args.target, args.max_tokens)
        config = NgramPredictorConfig(bucket_rule=args.bucket_rule, point_rule=args.point_rule)
        report = evaluate(examples, args.target, max_tokens, config,
                          widths=args.bucket_widths, test_percent=args.test_percent,
                          warmup=args.warmup, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"shuffleinfer predictor eval: error: {e}", file=sys.stderr)
        return _USAGE
    render_table(report)
    if args.json:
        print(json.dumps(asdict(report) | {"goals": goals(report)}, sort_keys=True))
    return 0
