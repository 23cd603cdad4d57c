"""Trace specs: the one string a user writes to name a workload (`--trace SPEC`).

Grammar (names and formats are case-insensitive)::

    SPEC   := NAME | FORMAT ":" PATH
    NAME   := azure2023-code | azure2023-conv | mooncake | sharegpt     (shipped traces)
            | lpld | lphd | hpld | hphd | mixed                       (workload classes)
    FORMAT := azure | mooncake | burstgpt | sharegpt-lengths

Shipped traces are read from `data_dir` (by default ``../shared/data`` beside the
repository); a PATH is taken as written (relative to the working directory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.records import Trace
from benchmarks.traces.azure import read_azure
from benchmarks.traces.burstgpt import read_burstgpt
from benchmarks.traces.classes import WorkloadClass, workload_class
from benchmarks.traces.context import fit_to_context
from benchmarks.traces.mooncake import read_mooncake
from benchmarks.traces.sharegpt import read_sharegpt_lengths

Reader = Callable[..., Trace]
"""``reader(path, *, name=None) -> Trace``."""

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
"""``../shared/data`` relative to the repository root."""

SHAREGPT_LENGTHS_FILE = "lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"

SHIPPED: dict[str, tuple[str, Reader]] = {
    "azure2023-code": ("traces/azure2023/AzureLLMInferenceTrace_code.csv", read_azure),
    "azure2023-conv": ("traces/azure2023/AzureLLMInferenceTrace_conv.csv", read_azure),
    "mooncake": ("traces/mooncake/conversation_trace.jsonl", read_mooncake),
    "sharegpt": (SHAREGPT_LENGTHS_FILE, read_sharegpt_lengths),
}
"""Shipped trace name -> (file under the data directory, reader)."""

FORMATS: dict[str, Reader] = {
    "azure": read_azure,
    "mooncake": read_mooncake,
    "burstgpt": read_burstgpt,
    "sharegpt-lengths": read_sharegpt_lengths,
}
"""FORMAT of a ``FORMAT:PATH`` spec -> reader."""


def known_specs() -> str:
    """The names and formats a spec may use, for help texts and error messages."""
    names = [*SHIPPED, *(c.value for c in WorkloadClass)]
    return (f"one of {', '.join(names)}, or FORMAT:PATH with FORMAT one of "
            f"{', '.join(FORMATS)}")


def load_trace(
    spec: str,
    *,
    data_dir: Path,
    max_model_len: int | None = None,
    seed: int = 0,
    num_requests: int | None = None,
) -> Trace:
    """Read or generate the trace `spec` names.

    With `max_model_len`, every trace is scaled as `fit_to_context` does so that no request
    exceeds the context (`Trace.length_scale` says by how much). With `num_requests`, only
    that many requests are kept before scaling: a sample drawn with `seed` for a workload
    class, the first ones in arrival order otherwise; `seed` matters for classes only.

    Raises `ValueError` for an unknown spec (listing the known names and formats) and
    `TraceError` (a `ValueError`) for an unreadable or malformed file.
    """
    text = spec.strip()
    key = text.lower()
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    if key in {c.value for c in WorkloadClass}:
        lengths = read_sharegpt_lengths(data_dir / SHAREGPT_LENGTHS_FILE)
        return workload_class(lengths, WorkloadClass(key), num_requests=num_requests,
                              seed=seed, max_model_len=max_model_len)
    if key in SHIPPED:
        relative, reader = SHIPPED[key]
        trace = reader(data_dir / relative, name=key)
    else:
        fmt, sep, path = text.partition(":")
        reader_or_none = FORMATS.get(fmt.strip().lower()) if sep else None
        if reader_or_none is None or not path.strip():
            raise ValueError(f"unknown trace spec {spec!r}: give {known_specs()}")
        trace = reader_or_none(Path(path.strip()))
    if num_requests is not None:
        trace = replace(trace, requests=trace.requests[:num_requests])
    return fit_to_context(trace, max_model_len) if max_model_len is not None else trace
