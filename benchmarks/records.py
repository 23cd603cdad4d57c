"""The two records every part of the harness shares.

A `TraceRequest` is one request as a trace describes it (when it arrives, how long its
prompt and its output are). A `RequestRecord` is what the client measured when it sent
that request to an endpoint. Readers produce the first, the client produces the second,
metrics and plots read the second.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    arrival_s: float
    """Seconds since the start of the trace (the first request arrives at 0)."""
    prompt_tokens: int
    output_tokens: int
    prefix_block_ids: tuple[int, ...] = ()
    """Mooncake `hash_ids`: equal ids at equal positions mean a shared prompt prefix."""
    block_tokens: int = 512
    """Prompt tokens per prefix block (Mooncake: 512)."""
    task: str | None = None
    """Workload class or task the request belongs to, where the trace says."""


@dataclass(frozen=True)
class Trace:
    """A named, time-ordered list of requests."""

    name: str
    requests: list[TraceRequest]
    source: str = ""
    """File(s) the trace was read from, or how it was generated."""
    length_scale: float = 1.0
    """Factor applied to every prompt and output length to fit the served model's context."""
    timed: bool = True
    """False when the trace has no timestamps (every `arrival_s` is 0): arrivals must then
    come from a request rate."""


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds since the run started)."""

    index: int
    endpoint: str
    scheduled_at_s: float
    """When the trace said the request arrives."""
    prompt_tokens: int
    """Prompt length actually sent (counted with the served model's tokenizer)."""
    max_tokens: int
    """Output length asked for (forced with ignore_eos / min_tokens)."""
    sent_at_s: float | None = None
    first_token_at_s: float | None = None
    finished_at_s: float | None = None
    output_tokens: int = 0
    """Output tokens received (the server's usage figure when it gives one)."""
    token_times_s: list[float] = field(default_factory=list)
    """Arrival time of every streamed chunk that carried text, in order."""
    ok: bool = False
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token, from sending."""
        if self.sent_at_s is None or self.first_token_at_s is None:
            return None
        return self.first_token_at_s - self.sent_at_s

    @property
    def e2e_s(self) -> float | None:
        """End-to-end latency, from sending to the last byte."""
        if self.sent_at_s is None or self.finished_at_s is None:
            return None
        return self.finished_at_s - self.sent_at_s

    @property
    def jct_s(self) -> float | None:
        """Job completion time: from the trace's arrival time to the last byte."""
        if self.finished_at_s is None:
            return None
        return self.finished_at_s - self.scheduled_at_s

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive streamed chunks."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT)."""
        if self.e2e_s is None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)
