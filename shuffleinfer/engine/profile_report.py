"""What `shuffleinfer calibrate --profile` shows: the measured steps beside the fitted
model's predictions, as a text table, a fit summary and a PNG plot. Pure (no engine)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shuffleinfer.engine.step_plan import StepSample
from shuffleinfer.sim.cost import FitReport, LinearCost


def predicted_s(model: LinearCost, sample: StepSample) -> float:
    """The model's latency for the sample's step (a profile step is prefill or decode)."""
    shape = sample.shape
    if shape.batch:
        return model.decode_s(shape.batch, shape.context)
    return model.prefill_s(shape.tokens, shape.attn)


def format_table(samples: Sequence[StepSample], model: LinearCost) -> str:
    """One line per step shape: its work, measured and predicted milliseconds."""
    lines = [f"{'case':<26} {'tokens':>6} {'attn':>9} {'batch':>5} {'context':>7} "
             f"{'steps':>5} {'measured ms':>11} {'predicted ms':>12} {'error':>7}"]
    for sample in samples:
        shape, predicted = sample.shape, predicted_s(model, sample)
        work = (f"{'-':>6} {'-':>9} {shape.batch:>5} {shape.context:>7}" if shape.batch
                else f"{shape.tokens:>6} {shape.attn:>9} {'-':>5} {'-':>7}")
        lines.append(f"{sample.case:<26} {work} {sample.num_steps:>5} "
                     f"{sample.seconds * 1e3:>11.2f} {predicted * 1e3:>12.2f} "
                     f"{predicted / sample.seconds - 1:>+7.1%}")
    return "\n".join(lines)


def format_report(model: LinearCost, report: FitReport) -> str:
    """The fitted coefficients in readable units and the fit's mean relative errors."""
    return "\n".join([
        f"prefill step = {model.prefill_base_s * 1e3:.3f} ms + "
        f"{model.prefill_per_token_s * 1e6:.2f} us/token + "
        f"{model.prefill_per_attn_s * 1e9:.3f} ns/attn; mean relative error "
        f"{report.prefill_mean_rel_error:.1%} over {report.num_prefill_steps} step shapes",
        f"decode step  = {model.decode_base_s * 1e3:.3f} ms + "
        f"{model.decode_per_req_s * 1e6:.2f} us/request + "
        f"{model.decode_per_ctx_s * 1e9:.3f} ns/context token; mean relative error "
        f"{report.decode_mean_rel_error:.1%} over {report.num_decode_steps} step shapes",
        f"KV hand-over = {model.kv_bytes_per_token:.0f} bytes/token at "
        f"{model.link_bytes_per_s / 1e9:.2f} GB/s "
        f"({model.handover_s(1000) * 1e3:.2f} ms per 1000 tokens)",
    ])


def write_plot(samples: Sequence[StepSample], model: LinearCost, path: Path,
               title: str) -> None:
    """Measured and predicted step latency: prefill against batched tokens, decode against
    summed context (one colour per batch size). Agg canvas, no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    prefill_ax, decode_ax = figure.subplots(1, 2)
    prefill = [s for s in samples if not s.shape.batch]
    prefill_ax.scatter([s.shape.tokens for s in prefill], [s.seconds * 1e3 for s in prefill],
                       label="measured")
    prefill_ax.scatter([s.shape.tokens for s in prefill],
                       [predicted_s(model, s) * 1e3 for s in prefill], marker="x",
                       color="black", label="predicted")
    prefill_ax.set_xlabel("batched prompt tokens")
    prefill_ax.set_title("prefill steps")
    for batch in sorted({s.shape.batch for s in samples if s.shape.batch}):
        group = [s for s in samples if s.shape.batch == batch]
        line = decode_ax.plot([s.shape.context for s in group],
                              [s.seconds * 1e3 for s in group], "o", label=f"batch {batch}")
        decode_ax.plot([s.shape.context for s in group],
                       [predicted_s(model, s) * 1e3 for s in group], "x",
                       color=line[0].get_color())
    decode_ax.set_xlabel("summed context tokens (x: predicted)")
    decode_ax.set_title("decode steps")
    for ax in (prefill_ax, decode_ax):
        ax.set_ylabel("step latency, ms")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
