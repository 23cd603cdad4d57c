"""The paper's workload classes, drawn from ShareGPT lengths.

ShuffleInfer (TetriInfer) groups requests by how heavy their prefill and decode are: a
prompt of more than 512 tokens is heavy prefill (HP, else LP), an output of more than 128
tokens heavy decode (HD, else LD). That gives the classes LPLD, LPHD, HPLD and HPHD, plus
Mixed (every request). Membership is decided on the original lengths; the chosen requests
are then scaled to fit the served model's context (`benchmarks.traces.context`), so a
scaled "heavy" request may be shorter than 512 tokens while it keeps its class label in
`TraceRequest.task`.
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum

import numpy as np

from benchmarks.records import Trace, TraceRequest
from benchmarks.traces.context import fit_to_context

HEAVY_PREFILL_TOKENS = 512
"""A prompt longer than this is heavy prefill."""
HEAVY_DECODE_TOKENS = 128
"""An output longer than this is heavy decode."""


class WorkloadClass(StrEnum):
    """A workload class of the paper; the value is its name in a trace spec."""

    LPLD = "lpld"
    LPHD = "lphd"
    HPLD = "hpld"
    HPHD = "hphd"
    MIXED = "mixed"


def class_of(prompt_tokens: int, output_tokens: int) -> WorkloadClass:
    """The class (never MIXED) a request of these lengths belongs to."""
    heavy_prefill = prompt_tokens > HEAVY_PREFILL_TOKENS
    heavy_decode = output_tokens > HEAVY_DECODE_TOKENS
    if heavy_prefill:
        return WorkloadClass.HPHD if heavy_decode else WorkloadClass.HPLD
    return WorkloadClass.LPHD if heavy_decode else WorkloadClass.LPLD


def workload_class(
    lengths: Trace,
    cls: WorkloadClass,
    *,
    num_requests: int | None = None,
    seed: int = 0,
    max_model_len: int | None = None,
) -> Trace:
    """An untimed trace of `cls` requests drawn from the length trace `lengths`.

    The members of `cls` are shuffled with `seed` (the same seed gives the same trace) and
    the first `num_requests` kept (all members when None), without replacement. Each
    request's `task` is its own class name in upper case (also under MIXED). With
    `max_model_len`, lengths are scaled to fit as `fit_to_context` does, over the chosen
    requests only. Raises `ValueError` when `num_requests` is below 1 or larger than the
    class, or when `lengths` was already scaled (classes are decided on original lengths).
    """
    if lengths.length_scale != 1.0:
        raise ValueError(
            f"workload classes are decided on original lengths, but {lengths.name} was "
            f"scaled by {lengths.length_scale}")
    labelled = ((r, class_of(r.prompt_tokens, r.output_tokens)) for r in lengths.requests)
    members = [(r, c) for r, c in labelled if cls in (WorkloadClass.MIXED, c)]
    if not members:
        raise ValueError(f"no {cls.name} requests in {lengths.source or lengths.name}")
    count = len(members) if num_requests is None else num_requests
    if count < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    if count > len(members):
        raise ValueError(
            f"{cls.name} has {len(members)} requests in {lengths.source or lengths.name}, "
            f"fewer than the {count} asked for")
    order = np.random.default_rng(seed).permutation(len(members))[:count]
    chosen: list[TraceRequest] = [
        replace(members[i][0], arrival_s=0.0, task=members[i][1].name) for i in order
    ]
    trace = Trace(
        name=cls.value,
        requests=chosen,
        source=f"{cls.name} class of {lengths.source or lengths.name} "
        f"({count} of {len(members)} requests, seed {seed})",
        timed=False,
    )
    return fit_to_context(trace, max_model_len) if max_model_len is not None else trace
