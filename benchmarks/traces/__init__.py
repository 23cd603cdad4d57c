"""Trace readers of the benchmark harness: every workload becomes a `Trace`.

`load_trace(spec, data_dir=...)` is the entry point (see `spec` for the grammar);
`arrival_times` and `select` decide when each request is sent and which ones a run keeps.
"""

from benchmarks.traces.arrivals import arrival_times, select
from benchmarks.traces.azure import read_azure
from benchmarks.traces.burstgpt import read_burstgpt
from benchmarks.traces.classes import WorkloadClass, class_of, workload_class
from benchmarks.traces.context import fit_to_context
from benchmarks.traces.errors import TraceError
from benchmarks.traces.mooncake import read_mooncake
from benchmarks.traces.sharegpt import read_sharegpt_lengths
from benchmarks.traces.spec import DEFAULT_DATA_DIR, FORMATS, SHIPPED, known_specs, load_trace

__all__ = [
    "DEFAULT_DATA_DIR",
    "FORMATS",
    "SHIPPED",
    "TraceError",
    "WorkloadClass",
    "arrival_times",
    "class_of",
    "fit_to_context",
    "known_specs",
    "load_trace",
    "read_azure",
    "read_burstgpt",
    "read_mooncake",
    "read_sharegpt_lengths",
    "select",
    "workload_class",
]
