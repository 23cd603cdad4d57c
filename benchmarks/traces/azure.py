"""Azure LLM inference traces (2023 "Splitwise" and 2024 week-long releases).

Both releases are CSV files with the columns ``TIMESTAMP,ContextTokens,GeneratedTokens``.
They differ in the timestamp: 2023 writes ``2023-11-16 18:15:46.6805900`` (no zone, seven
fractional digits), 2024 writes ``2024-05-10 00:00:00.009930+00:00`` (UTC offset, six
digits). Both are parsed exactly (integer nanoseconds) before the first arrival is
subtracted, so sub-microsecond gaps survive; a timestamp without a zone counts as UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.records import Trace, TraceRequest
from benchmarks.traces._common import csv_rows, make_trace, parse_count
from benchmarks.traces.errors import TraceError

_TIMESTAMP = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<time>\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<fraction>\d{1,9}))?(?P<zone>Z|[+-]\d{2}:?\d{2})?"
)


def parse_timestamp_ns(text: str) -> int:
    """Nanoseconds since the Unix epoch for an Azure trace timestamp.

    Raises `ValueError` when `text` is not a date and time of either release's form.
    """
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a timestamp like '2023-11-16 18:15:46.6805900': {text!r}")
    zone = match["zone"] or ""
    if zone == "Z":
        zone = "+00:00"
    whole = datetime.fromisoformat(f"{match['date']}T{match['time']}{zone}")
    if whole.tzinfo is None:
        whole = whole.replace(tzinfo=UTC)
    fraction = (match["fraction"] or "").ljust(9, "0")
    epoch = whole - datetime(1970, 1, 1, tzinfo=UTC)
    seconds = epoch.days * 86_400 + epoch.seconds
    return seconds * 1_000_000_000 + int(fraction)


def read_azure(path: Path, *, name: str | None = None) -> Trace:
    """Read an Azure LLM inference trace (2023 or 2024 layout) from `path`.

    Raises `TraceError` naming the file and line for a missing column, a bad timestamp, a
    length that is not a whole number or is below 1, or a file without requests.
    """
    stamps: list[int] = []
    lengths: list[tuple[int, int]] = []
    for line, row in csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            stamps.append(parse_timestamp_ns(row["TIMESTAMP"]))
        except ValueError as e:
            raise TraceError(path, line, f"bad timestamp in TIMESTAMP: {e}") from e
        prompt = parse_count(path, line, "ContextTokens", row["ContextTokens"], minimum=1)
        output = parse_count(path, line, "GeneratedTokens", row["GeneratedTokens"], minimum=1)
        lengths.append((prompt, output))
    start = min(stamps, default=0)
    requests = [
        TraceRequest(arrival_s=(ns - start) / 1e9, prompt_tokens=p, output_tokens=o)
        for ns, (p, o) in zip(stamps, lengths, strict=True)
    ]
    return make_trace(path, name or path.stem, requests)
