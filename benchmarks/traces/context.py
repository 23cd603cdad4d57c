"""Shrinking a trace's lengths so that every request fits the served model's context.

A trace recorded against a large model (Mooncake prompts reach 126k tokens) cannot be
replayed as-is against a small one. Rather than dropping or clipping the long requests,
which would change the mix, every length is multiplied by the same factor

    scale = min(1, max_model_len / max(prompt + output over the requests))

and rounded *down* (at least 1 token). Rounding down is what guarantees the fit: rounding
to nearest could push the longest request one token past the context.
"""

from __future__ import annotations

import math
from dataclasses import replace

from benchmarks.records import Trace, TraceRequest


def context_scale(requests: list[TraceRequest], max_model_len: int) -> float:
    """The factor that makes the longest request (prompt + output) fit `max_model_len`,
    or 1.0 when all already fit."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2 tokens, got {max_model_len}")
    longest = max((r.prompt_tokens + r.output_tokens for r in requests), default=0)
    return min(1.0, max_model_len / longest) if longest else 1.0


def scale_length(tokens: int, scale: float) -> int:
    """`tokens` times `scale`, rounded down, at least 1."""
    return max(1, math.floor(tokens * scale))


def fit_to_context(trace: Trace, max_model_len: int) -> Trace:
    """`trace` with every prompt, output and prefix-block length scaled by
    `context_scale`; the factor is multiplied into `Trace.length_scale`.

    Returns `trace` itself when nothing needs to shrink. Raises `ValueError` when
    `max_model_len` is below 2 (one prompt and one output token).
    """
    scale = context_scale(trace.requests, max_model_len)
    if scale == 1.0:
        return trace
    requests = [
        replace(
            r,
            prompt_tokens=scale_length(r.prompt_tokens, scale),
            output_tokens=scale_length(r.output_tokens, scale),
            block_tokens=scale_length(r.block_tokens, scale),
        )
        for r in trace.requests
    ]
    return replace(trace, requests=requests, length_scale=trace.length_scale * scale)
