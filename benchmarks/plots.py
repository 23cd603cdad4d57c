"""PNG plots comparing the systems of a benchmark run.

`write_plots` draws four figures, one line per system: the CDF of TTFT, the CDF of JCT,
output throughput over time and the request queue over time. Times on the x axes are
seconds since the run started, as in `RequestRecord`. The series behind the last two are
public (`throughput_over_time`, `queue_over_time`) so they can be checked or reused.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend state
is touched and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.metrics import token_arrivals
from benchmarks.records import RequestRecord

MAX_THROUGHPUT_BINS = 600
"""Throughput bins are 1 s wide unless the run is longer than this many seconds."""


def write_plots(
    records_by_system: Mapping[str, list[RequestRecord]], out_dir: Path, *, title: str
) -> list[Path]:
    """Write `ttft_cdf.png`, `jct_cdf.png`, `throughput.png` and `queue.png` to `out_dir`.

    `out_dir` is created if missing. Failed requests are left out of the CDFs and the
    throughput (as in the summary metrics; each CDF legend says how many failed) but are
    part of the queue while they were outstanding. Returns the written paths.
    """
    if not records_by_system:
        raise ValueError("records_by_system is empty: give the records of at least one system")
    out_dir = _prepare_dir(Path(out_dir))
    horizon_s = max(_horizon_s(records) for records in records_by_system.values())
    figures = {
        "ttft_cdf.png": _cdf_figure(
            records_by_system, lambda r: r.ttft_s, 1000.0, "TTFT (ms)", f"{title}: TTFT CDF"
        ),
        "jct_cdf.png": _cdf_figure(
            records_by_system, lambda r: r.jct_s, 1.0, "JCT (s)", f"{title}: JCT CDF"
        ),
        "throughput.png": _throughput_figure(records_by_system, horizon_s, title),
        "queue.png": _queue_figure(records_by_system, horizon_s, title),
    }
    paths = []
    for name, figure in figures.items():
        path = out_dir / name
        figure.savefig(path, dpi=100)
        paths.append(path)
    return paths


def throughput_over_time(
    records: list[RequestRecord], horizon_s: float, bin_s: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens/s of completed requests in bins: returns (bin edges, rates).

    Bins are `bin_s` wide (default: 1 s, or wider so that `[0, horizon_s]` holds at most
    `MAX_THROUGHPUT_BINS`). Tokens are placed at their chunk's arrival, weighted as in
    `metrics.token_arrivals`.
    """
    if not (math.isfinite(horizon_s) and horizon_s > 0):
        raise ValueError(f"horizon_s must be a positive number of seconds, got {horizon_s!r}")
    if bin_s is None:
        bin_s = max(1.0, horizon_s / MAX_THROUGHPUT_BINS)
    elif not (math.isfinite(bin_s) and bin_s > 0):
        raise ValueError(f"bin_s must be a positive number of seconds, got {bin_s!r}")
    num_bins = max(1, math.ceil(horizon_s / bin_s))
    edges = np.arange(num_bins + 1) * bin_s
    arrivals = [a for r in records if r.ok for a in token_arrivals(r)]
    times = np.array([t for t, _ in arrivals], dtype=float)
    weights = np.array([n for _, n in arrivals], dtype=float)
    counts, _ = np.histogram(times, bins=edges, weights=weights)
    return edges, counts / bin_s


def queue_over_time(
    records: list[RequestRecord], horizon_s: float
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Step series of requests in flight and waiting: ((times, in flight), (times, waiting)).

    In flight: sent and not finished. Waiting: sent and no first token yet. Each series
    starts at (0, 0); the count at `times[i]` holds until `times[i + 1]`; the last point
    is at `horizon_s`. A request that never reports a finish (it failed without the client
    noting when) ends at its last known time rather than staying in flight forever.
    """
    in_flight = []
    waiting = []
    for r in records:
        if r.sent_at_s is None:
            continue
        end = r.finished_at_s if r.finished_at_s is not None else _last_seen_s(r)
        in_flight.append((r.sent_at_s, end))
        waiting.append((r.sent_at_s, r.first_token_at_s if r.first_token_at_s is not None else end))
    return _occupancy(in_flight, horizon_s), _occupancy(waiting, horizon_s)


def _prepare_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"plot out_dir {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create plot out_dir {out_dir}: {e.strerror or e}") from e
    return out_dir


def _last_seen_s(r: RequestRecord) -> float:
    known = [t for t in (r.sent_at_s, r.first_token_at_s, r.finished_at_s) if t is not None]
    return max(known + r.token_times_s)


def _horizon_s(records: list[RequestRecord]) -> float:
    """The latest time any record knows of (at least 1 s, so axes are never empty)."""
    times = [
        _last_seen_s(r) for r in records if r.sent_at_s is not None or r.finished_at_s is not None
    ]
    return max([1.0, *times])


def _occupancy(
    intervals: list[tuple[float, float]], horizon_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """How many intervals are open over time, as a step series from 0 to `horizon_s`."""
    # At equal times closings sort before openings: back-to-back requests do not overlap.
    events = sorted(
        [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
        key=lambda e: (e[0], e[1]),
    )
    times = np.array([0.0] + [t for t, _ in events] + [horizon_s])
    deltas = np.array([0] + [d for _, d in events] + [0])
    return times, np.cumsum(deltas)


def _new_figure(rows: int = 1) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(8, 4.5 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return figure, axes


def _cdf_figure(
    records_by_system: Mapping[str, list[RequestRecord]],
    value_s: Callable[[RequestRecord], float | None],
    scale: float,
    xlabel: str,
    title: str,
) -> Figure:
    figure, (ax,) = _new_figure()
    for system, records in records_by_system.items():
        values = sorted(v * scale for r in records if r.ok and (v := value_s(r)) is not None)
        num_failed = sum(not r.ok for r in records)
        label = f"{system} (n={len(values)}" + (f", {num_failed} failed)" if num_failed else ")")
        if values:
            fractions = np.arange(1, len(values) + 1) / len(values)
            ax.plot(values, fractions, drawstyle="steps-post", label=label)
        else:
            ax.plot([], [], label=f"{label}: no completed requests")
    ax.set(xlabel=xlabel, ylabel="fraction of completed requests", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return figure


def _throughput_figure(
    records_by_system: Mapping[str, list[RequestRecord]], horizon_s: float, title: str
) -> Figure:
    figure, (ax,) = _new_figure()
    for system, records in records_by_system.items():
        edges, rates = throughput_over_time(records, horizon_s)
        ax.stairs(rates, edges, label=system)
    bin_s = max(1.0, horizon_s / MAX_THROUGHPUT_BINS)
    ax.set(
        xlabel="time since start (s)",
        ylabel=f"output tokens/s ({bin_s:.3g}-s bins)",
        title=f"{title}: output throughput",
        xlim=(0, horizon_s),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return figure


def _queue_figure(
    records_by_system: Mapping[str, list[RequestRecord]], horizon_s: float, title: str
) -> Figure:
    figure, (flight_ax, wait_ax) = _new_figure(rows=2)
    for system, records in records_by_system.items():
        (flight_t, flight_n), (wait_t, wait_n) = queue_over_time(records, horizon_s)
        flight_ax.plot(flight_t, flight_n, drawstyle="steps-post", label=system)
        wait_ax.plot(wait_t, wait_n, drawstyle="steps-post", label=system)
    flight_ax.set(ylabel="requests in flight", title=f"{title}: requests sent, not finished")
    wait_ax.set(ylabel="requests waiting", title=f"{title}: requests sent, no first token yet")
    for ax in (flight_ax, wait_ax):
        ax.set(xlabel="time since start (s)", xlim=(0, horizon_s))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    return figure
