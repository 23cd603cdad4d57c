"""Mooncake (FAST'25) JSONL traces.

One JSON object a line: ``timestamp`` (ms since the start of the trace), ``input_length``,
``output_length`` and ``hash_ids``, the prompt's 512-token prefix blocks (equal ids at
equal positions mean a shared prefix, i.e. reusable KV cache).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.records import Trace, TraceRequest
from benchmarks.traces._common import make_trace, parse_count
from benchmarks.traces.errors import TraceError

MOONCAKE_BLOCK_TOKENS = 512
"""Prompt tokens per `hash_ids` entry (the trace's README)."""

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def _parse_line(path: Path, line: int, text: str) -> TraceRequest:
    try:
        entry: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(path, line, f"not JSON: {e.msg}") from e
    if not isinstance(entry, dict):
        raise TraceError(path, line, "not a JSON object")
    missing = [f for f in _FIELDS if f not in entry]
    if missing:
        raise TraceError(path, line, f"missing field {', '.join(map(repr, missing))}")
    stamp = entry["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise TraceError(path, line, f"bad timestamp: {stamp!r}")
    hash_ids = entry["hash_ids"]
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise TraceError(path, line, f"hash_ids is not a list of integers: {hash_ids!r}")
    return TraceRequest(
        arrival_s=stamp / 1000,
        prompt_tokens=parse_count(path, line, "input_length", str(entry["input_length"]),
                                  minimum=1),
        output_tokens=parse_count(path, line, "output_length", str(entry["output_length"]),
                                  minimum=1),
        prefix_block_ids=tuple(hash_ids),
        block_tokens=MOONCAKE_BLOCK_TOKENS,
    )


def read_mooncake(path: Path, *, name: str | None = None) -> Trace:
    """Read a Mooncake JSONL trace from `path` (blank lines are ignored).

    Raises `TraceError` naming the file and line for a line that is not a JSON object, a
    missing field, a bad timestamp, a length that is not a whole number or is below 1, or a
    file without requests.
    """
    requests: list[TraceRequest] = []
    try:
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    requests.append(_parse_line(path, line, text))
    except OSError as e:
        raise TraceError(path, None, f"cannot read the file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TraceError(path, None, f"not UTF-8 text: {e}") from e
    if not requests:
        raise TraceError(path, 1, "empty file (no requests)")
    return make_trace(path, name or path.stem, requests)
