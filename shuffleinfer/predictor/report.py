"""Presenting an evaluation: the rich table and the check of the issue's goals."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from shuffleinfer.predictor.baselines import (
    ConstantMedian,
    LearnedPredictor,
    PerTaskMedian,
)
from shuffleinfer.predictor.evaluate import EvalReport, Scores


def _best_baseline(scores: dict[str, Scores]) -> tuple[str, str]:
    """Names of the baselines with the lowest MAE and the highest primary-width accuracy."""
    baselines = {k: v for k, v in scores.items() if k != LearnedPredictor.name}
    width = next(iter(next(iter(baselines.values())).accuracy))
    by_mae = min(baselines, key=lambda k: baselines[k].mae)
    by_acc = max(baselines, key=lambda k: baselines[k].accuracy[width])
    return by_mae, by_acc


def goals(report: EvalReport) -> dict[str, Any]:
    """The issue's goals, held out and prequential: MAE <= 0.6x the constant median and
    <= 0.8x the best baseline; primary-width accuracy >= best baseline + 10 points."""
    out: dict[str, Any] = {}
    width = report.widths[0]
    for kind, scores in (("held_out", report.held_out), ("prequential", report.prequential)):
        ours = scores[LearnedPredictor.name]
        by_mae, by_acc = _best_baseline(scores)
        mae_vs_constant = ours.mae / max(scores[ConstantMedian.name].mae, 1e-9)
        mae_vs_best = ours.mae / max(scores[by_mae].mae, 1e-9)
        acc_gain = 100 * (ours.accuracy[width] - scores[by_acc].accuracy[width])
        out[kind] = {
            "mae_vs_constant_median": round(mae_vs_constant, 3),
            "mae_vs_best_baseline": round(mae_vs_best, 3), "best_mae_baseline": by_mae,
            "accuracy_gain_points": round(acc_gain, 1), "best_accuracy_baseline": by_acc,
            "met": mae_vs_constant <= 0.6 and mae_vs_best <= 0.8 and acc_gain >= 10}
    return out


def render_table(report: EvalReport, console: Console | None = None) -> None:
    """Print the figures as a table, the goals under it."""
    if console is None:  # wide enough for the table even when not on a terminal
        console = Console(width=max(Console().width, 110))
    width = report.widths[0]
    console.print(f"output-length prediction, target {report.target} (max_tokens "
                  f"{report.max_tokens}); held out: train {report.num_train} / test "
                  f"{report.num_test} prompts (split by prompt_id); prequential: "
                  f"{report.num_stream} requests in file order, figures after the first "
                  f"{report.warmup}")
    table = Table()
    table.add_column("predictor", no_wrap=True)
    for w in report.widths:
        table.add_column(f"acc@{w}", justify="right")
    table.add_column(f"±1@{width}", justify="right")
    table.add_column("MAE", justify="right")
    table.add_column(f"preq\nacc@{width}", justify="right")
    table.add_column("preq\nMAE", justify="right")
    for name, held in report.held_out.items():
        preq = report.prequential[name]
        table.add_row(name, *(f"{100 * held.accuracy[w]:.1f}%" for w in report.widths),
                      f"{100 * held.within_one[width]:.1f}%", f"{held.mae:.1f}",
                      f"{100 * preq.accuracy[width]:.1f}%", f"{preq.mae:.1f}")
    console.print(table)
    console.print(f"{PerTaskMedian.name}: the task label is an oracle feature, not known "
                  f"when serving. MAE in tokens, at bucket width {width}.")
    for kind, g in goals(report).items():
        console.print(
            f"{kind}: MAE {g['mae_vs_constant_median']:.2f}x constant median (goal <= 0.6), "
            f"{g['mae_vs_best_baseline']:.2f}x best baseline (goal <= 0.8); acc@{width} "
            f"{g['accuracy_gain_points']:+.1f} points over the best baseline (goal >= +10): "
            f"{'met' if g['met'] else 'not met'}")
