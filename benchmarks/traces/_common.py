"""What the readers share: CSV rows with their line numbers, number parsing that names the
bad cell, and turning parsed requests into a trace sorted by arrival that starts at 0."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from benchmarks.records import Trace, TraceRequest
from benchmarks.traces.errors import TraceError


def column_key(name: str) -> str:
    """How column names are compared: case, spaces and underscores do not count, so
    ``Session ID``, ``SessionID`` and ``session_id`` are the same column."""
    return re.sub(r"[\s_]+", "", name).lower()


def csv_rows(
    path: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, {column: text})`` for every non-blank data row of a CSV file.

    The dict holds the `required` columns and those of `optional` the header has, keyed by
    the names given here (the header may spell them with other case, spaces or
    underscores). Raises `TraceError` for an unreadable or empty file, a header without a
    required column, or a row whose field count differs from the header's.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise TraceError(path, 1, "empty file (no header line)")
            index = {column_key(name): i for i, name in enumerate(header)}
            missing = [c for c in required if column_key(c) not in index]
            if missing:
                raise TraceError(
                    path, 1, f"missing column {', '.join(map(repr, missing))} "
                    f"(the header has {', '.join(map(repr, header))})")
            wanted = [(c, index[column_key(c)]) for c in (*required, *optional)
                      if column_key(c) in index]
            for row in reader:
                if len(row) <= 1 and not "".join(row).strip():
                    continue  # a blank line
                if len(row) != len(header):
                    raise TraceError(path, reader.line_num,
                                     f"{len(row)} fields, the header has {len(header)}")
                yield reader.line_num, {c: row[i].strip() for c, i in wanted}
    except OSError as e:
        raise TraceError(path, None, f"cannot read the file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TraceError(path, None, f"not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise TraceError(path, None, f"malformed CSV: {e}") from e


def parse_count(path: Path, line: int, column: str, text: str, *, minimum: int = 0) -> int:
    """A token count: a whole number (``12`` or ``12.0``) of at least `minimum`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not value.is_integer():
        raise TraceError(path, line, f"{column} is not a whole number: {text!r}")
    if value < 0:
        raise TraceError(path, line, f"{column} is negative: {text}")
    if value < minimum:
        raise TraceError(path, line, f"{column} must be at least {minimum}, got {text}")
    return int(value)


def parse_seconds(path: Path, line: int, column: str, text: str) -> float:
    """A relative timestamp: a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise TraceError(path, line, f"bad timestamp in {column}: {text!r}")
    return value


def make_trace(
    path: Path, name: str, requests: list[TraceRequest], *, timed: bool = True,
    source: str | None = None,
) -> Trace:
    """Sort `requests` by arrival (ties keep file order) and shift them so the first one
    arrives at 0. A file without a single request is an error."""
    if not requests:
        raise TraceError(path, None, "no requests in the file")
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    start = ordered[0].arrival_s
    if start != 0:
        ordered = [replace(r, arrival_s=r.arrival_s - start) for r in ordered]
    return Trace(name=name, requests=ordered, source=source or str(path), timed=timed)
