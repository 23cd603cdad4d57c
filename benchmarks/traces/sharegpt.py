"""ShareGPT-style length CSVs: one conversation turn a row, prompt and answer lengths only.

The shipped file (from Sarathi-Serve, Llama-2 tokenizer) has the columns
``num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio``; only the first two
are read. There are no timestamps: the trace is untimed (every arrival is 0, file order
is kept) and a replay needs a request rate.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.records import Trace, TraceRequest
from benchmarks.traces._common import csv_rows, make_trace, parse_count

_PROMPT = "num_prefill_tokens"
_OUTPUT = "num_decode_tokens"


def read_sharegpt_lengths(path: Path, *, name: str | None = None) -> Trace:
    """Read a ShareGPT length CSV from `path` into an untimed trace (``timed=False``).

    Raises `TraceError` naming the file and line for a missing column, a length that is
    not a whole number or is below 1, or a file without requests.
    """
    requests = [
        TraceRequest(
            arrival_s=0.0,
            prompt_tokens=parse_count(path, line, _PROMPT, row[_PROMPT], minimum=1),
            output_tokens=parse_count(path, line, _OUTPUT, row[_OUTPUT], minimum=1),
        )
        for line, row in csv_rows(path, (_PROMPT, _OUTPUT))
    ]
    return make_trace(path, name or path.stem, requests, timed=False)
