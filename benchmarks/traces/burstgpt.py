"""BurstGPT CSV traces (GPT-3.5 / GPT-4 behind Azure OpenAI, HPMLL/BurstGPT).

Two column layouts were published:

- the original release (``BurstGPT_1.csv`` ...):
  ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``;
- the later one (release v2.0, third file), which adds conversation columns:
  ``Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,
  Log Type`` (``Session ID`` is empty for most rows).

Columns are found by name, so both layouts (and any column order) read the same way.
``Timestamp`` is seconds since the start of the collection. A row with 0 response tokens
is a failed request: it is skipped and counted, and the count is logged and written into
`Trace.source`. So are rows with an empty prompt (0 request tokens).
"""

from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.records import Trace, TraceRequest
from benchmarks.traces._common import csv_rows, make_trace, parse_count, parse_seconds
from benchmarks.traces.errors import TraceError

logger = logging.getLogger(__name__)

_REQUIRED = ("Timestamp", "Request tokens", "Response tokens")


def read_burstgpt(path: Path, *, name: str | None = None) -> Trace:
    """Read a BurstGPT CSV (either layout) from `path`, skipping failed requests.

    Raises `TraceError` naming the file and line for a missing column, a bad timestamp, a
    token count that is not a whole number or is negative, or a file without a single
    successful request.
    """
    requests: list[TraceRequest] = []
    num_failed = 0
    num_empty_prompts = 0
    for line, row in csv_rows(path, _REQUIRED):
        arrival_s = parse_seconds(path, line, "Timestamp", row["Timestamp"])
        prompt = parse_count(path, line, "Request tokens", row["Request tokens"])
        output = parse_count(path, line, "Response tokens", row["Response tokens"])
        if output == 0:
            num_failed += 1
        elif prompt == 0:
            num_empty_prompts += 1
        else:
            requests.append(TraceRequest(arrival_s, prompt_tokens=prompt, output_tokens=output))
    skipped = []
    if num_failed:
        skipped.append(f"{num_failed} failed requests (0 response tokens)")
    if num_empty_prompts:
        skipped.append(f"{num_empty_prompts} requests with 0 request tokens")
    if skipped and not requests:
        raise TraceError(path, None, f"no successful requests (all {' and '.join(skipped)})")
    source = str(path)
    if skipped:
        source += f" (skipped {' and '.join(skipped)})"
        logger.info("BurstGPT %s: skipped %s", path, " and ".join(skipped))
    return make_trace(path, name or path.stem, requests, source=source)
