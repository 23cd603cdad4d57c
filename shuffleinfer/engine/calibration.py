"""The chunk size of a model on this machine: the saturation point of prefill throughput.

The paper runs prefill in fixed chunks of the accelerator's saturation point: the
smallest number of batched tokens past which a bigger batch buys little more throughput.
A smaller chunk wastes compute, a bigger one only makes the step (and everyone waiting
behind it) longer. `shuffleinfer calibrate` measures the curve on the real engine and
saves a `Calibration` under `<cache dir>/calibration/<model>.json`; `serve` reads it back
through `resolved_chunk_size` unless `--chunk-size` is given.

Everything here is pure (no engine, no Ray), so the rule and the file format are tested
on synthetic curves.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from shuffleinfer.config import ServeConfig
from shuffleinfer.model.prepare import default_cache_dir

DEFAULT_CHUNK_SIZE = 512
"""What `serve` runs when neither `--chunk-size` nor a calibration says otherwise."""
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 16, 1 << 20
"""The bounds `ServeConfig.chunk_size` accepts; a calibrated size must fit them too."""


@dataclass(frozen=True)
class Calibration:
    """One measured curve and the chunk size chosen from it (the JSON file's content)."""

    model: str
    """The `--model` value as given (an embedded name, HF id or path), as serve sees it."""
    dtype: str
    """The engine dtype measured with (`auto` already resolved)."""
    cpus: int
    """Cores the engine was bound to: one serving instance's `cpus_per_instance`."""
    sizes: list[int]
    """Batched prompt tokens per step, ascending."""
    seconds: list[float]
    """Median seconds of one prefill step of each size."""
    tokens_per_s: list[float]
    threshold: float
    """Fraction of the best throughput the chunk size must reach."""
    chunk_size: int
    date: str
    """When it was measured, ISO 8601 in UTC."""
    repeats: int = 1
    """Timed runs per size the medians are over."""


def saturation_point(sizes: Sequence[int], tokens_per_s: Sequence[float],
                     threshold: float) -> int:
    """The smallest size whose throughput is at least `threshold` of the best measured.

    Raises ValueError for empty or mismatched curves, a non-positive throughput or a
    threshold outside (0, 1].
    """
    if not sizes or len(sizes) != len(tokens_per_s):
        raise ValueError(f"need one throughput per size, got {len(sizes)} sizes and "
                         f"{len(tokens_per_s)} throughputs")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if min(tokens_per_s) <= 0:
        raise ValueError(f"throughputs must be > 0, got {list(tokens_per_s)}")
    best = max(tokens_per_s)
    return min(size for size, rate in zip(sizes, tokens_per_s, strict=True)
               if rate >= threshold * best)


def make_calibration(model: str, dtype: str, cpus: int, sizes: Sequence[int],
                     seconds: Sequence[float], threshold: float, repeats: int) -> Calibration:
    """A calibration from measured step times: throughputs and the saturation point."""
    ordered = sorted(zip(sizes, seconds, strict=True))
    tokens_per_s = [size / s for size, s in ordered]
    return Calibration(
        model=model, dtype=dtype, cpus=cpus, sizes=[size for size, _ in ordered],
        seconds=[s for _, s in ordered], tokens_per_s=tokens_per_s, threshold=threshold,
        chunk_size=saturation_point([size for size, _ in ordered], tokens_per_s, threshold),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        repeats=repeats)


def calibration_name(model: str) -> str:
    """File stem for a `--model` value: an embedded name as is, `/` (HF ids, paths) as
    `--`, the way the Hugging Face cache spells repository ids."""
    return model.strip("/").replace("/", "--")


def calibration_path(model: str, cache_dir: Path | None = None) -> Path:
    """Where `calibrate` saves, and `serve` looks for, `model`'s calibration: beside the
    prepared models, in `<cache dir>/calibration/`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "calibration" / f"{calibration_name(model)}.json"


def write_calibration(path: Path, calibration: Calibration) -> None:
    """Save as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(calibration), indent=2) + "\n")


def read_calibration(path: Path) -> Calibration:
    """Load a saved calibration; raises OSError if unreadable, ValueError if it is not
    one `calibrate` could have written (missing fields, a chunk size serve refuses)."""
    try:
        data = json.loads(path.read_text())
        calibration = Calibration(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a calibration file: {e}") from e
    chunk_size = calibration.chunk_size
    if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"{path}: chunk_size must be an integer in "
                         f"[{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size!r}")
    return calibration


def resolved_chunk_size(config: ServeConfig) -> tuple[int, str]:
    """The chunk size every instance runs, and where it came from (for the start log).

    A given `--chunk-size` wins; else this model's calibration, if `calibrate` saved one
    under the config's cache dir; else `DEFAULT_CHUNK_SIZE`. An unreadable calibration
    is not fatal (serving still works at the default) but the returned source says why
    it was ignored.
    """
    if config.chunk_size is not None:
        return config.chunk_size, "--chunk-size"
    path = calibration_path(config.model, config.cache_dir)
    if not path.is_file():
        return DEFAULT_CHUNK_SIZE, (f"default; no calibration at {path}, "
                                    "`shuffleinfer calibrate` measures one")
    try:
        calibration = read_calibration(path)
    except (OSError, ValueError) as e:
        return DEFAULT_CHUNK_SIZE, f"default; ignored the calibration: {e}"
    if calibration.model != config.model:
        return DEFAULT_CHUNK_SIZE, (f"default; {path} was measured for {calibration.model!r}, "
                                    f"not {config.model!r}")
    source = f"calibrated on this machine, {path}"
    if calibration.cpus != config.cpus_per_instance:
        source += (f"; measured on {calibration.cpus} cores per instance, serving on "
                   f"{config.cpus_per_instance}: run calibrate with --cpus-per-instance "
                   f"{config.cpus_per_instance}")
    return calibration.chunk_size, source


def write_plot(calibration: Calibration, path: Path) -> None:
    """Throughput against batched tokens (log2 axis), the chunk size and threshold marked.
    Drawn on the Agg canvas without pyplot: no global backend, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    best = max(calibration.tokens_per_s)
    ax.plot(calibration.sizes, calibration.tokens_per_s, marker="o", label="prefill")
    ax.axhline(calibration.threshold * best, color="grey", linestyle=":",
               label=f"{calibration.threshold:.0%} of best")
    chunk_rate = calibration.tokens_per_s[calibration.sizes.index(calibration.chunk_size)]
    ax.plot([calibration.chunk_size], [chunk_rate], marker="*", markersize=16, color="red",
            linestyle="none", label=f"chunk size {calibration.chunk_size}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(calibration.sizes, [str(s) for s in calibration.sizes])
    ax.set_xlabel("batched prompt tokens per step")
    ax.set_ylabel("prefill tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{calibration.model} ({calibration.dtype}, {_cores(calibration.cpus)})")
    ax.legend(loc="lower right")
    figure.savefig(path, dpi=120)


def format_table(calibration: Calibration) -> str:
    """The curve as a text table, then the chosen chunk size."""
    best = max(calibration.tokens_per_s)
    lines = [f"{'tokens':>8} {'seconds':>10} {'tokens/s':>10} {'of best':>8}"]
    for size, seconds, rate in zip(calibration.sizes, calibration.seconds,
                                   calibration.tokens_per_s, strict=True):
        mark = "  <- chunk size" if size == calibration.chunk_size else ""
        lines.append(f"{size:>8} {seconds:>10.4f} {rate:>10.1f} {rate / best:>8.2f}{mark}")
    lines.append(f"chunk size {calibration.chunk_size}: the smallest batch at >= "
                 f"{calibration.threshold:.0%} of the best {best:.1f} tokens/s "
                 f"({calibration.model}, {calibration.dtype}, {_cores(calibration.cpus)})")
    return "\n".join(lines)


def _cores(num: int) -> str:
    return f"{num} core" if num == 1 else f"{num} cores"
