"""Plots are written as real PNGs, and the series behind them hold the right numbers."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from benchmarks.plots import queue_over_time, throughput_over_time, write_plots
from benchmarks.records import RequestRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(
    index: int, sent: float, tokens: list[float], *, ok: bool = True, finished: float | None = None
) -> RequestRecord:
    return RequestRecord(
        index=index,
        endpoint="http://test",
        scheduled_at_s=sent,
        prompt_tokens=10,
        max_tokens=8,
        sent_at_s=sent,
        first_token_at_s=tokens[0] if tokens else None,
        finished_at_s=finished if finished is not None else (tokens[-1] if tokens else None),
        output_tokens=len(tokens),
        token_times_s=tokens,
        ok=ok,
        error=None if ok else "connection reset",
    )


GOOD = [
    _record(0, 0.0, [0.5, 0.8, 1.2, 1.6]),
    _record(1, 0.2, [1.0, 1.4, 2.5]),
]
FAILED = _record(2, 0.4, [], ok=False, finished=0.9)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is suspiciously small ({len(data)} bytes)"
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    return width, height


def test_writes_four_pngs_for_two_systems_with_a_failure(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "run1"  # created on demand
    paths = write_plots({"vllm": [*GOOD, FAILED], "shuffleinfer": GOOD}, out, title="t")
    assert [p.name for p in paths] == ["ttft_cdf.png", "jct_cdf.png", "throughput.png", "queue.png"]
    for path in paths:
        assert path.parent == out
        width, height = _png_size(path)
        assert width >= 400 and height >= 300


def test_one_system_whose_requests_all_failed(tmp_path: Path) -> None:
    paths = write_plots({"only": [FAILED]}, tmp_path, title="all failed")
    assert len(paths) == 4
    for path in paths:
        _png_size(path)


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "results.json"
    not_a_dir.write_text("{}")
    with pytest.raises(NotADirectoryError, match="results.json"):
        write_plots({"vllm": GOOD}, not_a_dir, title="t")


def test_no_systems_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one system"):
        write_plots({}, tmp_path, title="t")


def test_throughput_bins_hold_tokens_per_second() -> None:
    edges, rates = throughput_over_time([*GOOD, FAILED], horizon_s=3.0)
    assert list(edges) == [0.0, 1.0, 2.0, 3.0]
    # tokens at 0.5, 0.8 | 1.0, 1.2, 1.4, 1.6 | 2.5
    assert list(rates) == [2.0, 4.0, 1.0]
    edges, rates = throughput_over_time(GOOD, horizon_s=3.0, bin_s=0.5)
    assert rates.sum() * 0.5 == pytest.approx(7)  # every token lands in exactly one bin


def test_long_runs_get_wider_throughput_bins() -> None:
    edges, _ = throughput_over_time(GOOD, horizon_s=6_000.0)
    assert len(edges) - 1 <= 600 and edges[1] - edges[0] == pytest.approx(10.0)


def _count_at(series: tuple[np.ndarray, np.ndarray], t: float) -> int:
    times, counts = series
    return int(counts[np.searchsorted(times, t, side="right") - 1])


def test_queue_counts_in_flight_and_waiting_requests() -> None:
    in_flight, waiting = queue_over_time([*GOOD, FAILED], horizon_s=3.0)
    # 0.0 A sent; 0.2 B sent; 0.4 failed one sent; 0.5 A's first token; 0.9 failure;
    # 1.0 B's first token; 1.6 A done; 2.5 B done.
    expected = {0.1: (1, 1), 0.3: (2, 2), 0.45: (3, 3), 0.7: (3, 2), 0.95: (2, 1), 1.1: (2, 0)}
    expected |= {2.0: (1, 0), 2.8: (0, 0)}
    for t, (n_flight, n_waiting) in expected.items():
        assert (_count_at(in_flight, t), _count_at(waiting, t)) == (n_flight, n_waiting), t
    assert in_flight[0][-1] == 3.0


def test_failure_without_a_finish_time_does_not_stay_in_flight() -> None:
    lost = RequestRecord(
        index=0, endpoint="e", scheduled_at_s=0.0, prompt_tokens=1, max_tokens=1, sent_at_s=1.0
    )
    in_flight, waiting = queue_over_time([lost], horizon_s=5.0)
    assert _count_at(in_flight, 3.0) == 0 and _count_at(waiting, 3.0) == 0
