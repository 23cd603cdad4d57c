"""A simulated cluster's configuration (`SimConfig`) and what a run produced (`SimResult`)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.records import RequestRecord
from shuffleinfer.scheduler.policies.flip import FlipConfig
from shuffleinfer.sim.request import SimRequest


@dataclass(frozen=True)
class SimConfig:
    """A simulated cluster and its policies."""

    num_prefill: int = 1
    num_decode: int = 1
    colocated: int = 0
    """> 0: that many colocated vLLM instances instead (the baseline)."""
    colocated_chunked: bool = True
    """How the colocated vLLM schedules: True, chunked prefill (vLLM's default since 0.6:
    prompt chunks ride in the decodes' steps); False, prefill first (vLLM's default before:
    waiting prompts run whole in a step of their own while every decode waits)."""
    chunk_size: int = 512
    kv_capacity_tokens: int = 100_000
    prefill_order: str = "sjf"
    sched_window: int = 16
    prefill_policy: str = "least_load"
    decode_policy: str = "shuffle"
    admission: str = "greedy"
    flip_policy: str = "never"
    flip: FlipConfig = FlipConfig()
    heavy_threshold_tokens: int = 128
    oracle_accuracy: float = 1.0
    bucket_width: int = 200
    max_tokens: int = 4096
    monitor_interval_s: float = 0.1
    request_overhead_s: float = 0.0
    """From a request's arrival to its placement: the serving path in front of the
    engines (HTTP, routing), which a GPU cluster's simulation can leave at 0."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.colocated < 0 or (self.colocated == 0 and min(self.num_prefill,
                                                              self.num_decode) < 1):
            raise ValueError("a cluster needs >= 1 prefill and >= 1 decode instance, or "
                             ">= 1 colocated instance")
        if self.chunk_size < 1 or self.kv_capacity_tokens < 1:
            raise ValueError("chunk_size and kv_capacity_tokens must be >= 1")

    @property
    def num_instances(self) -> int:
        return self.colocated or self.num_prefill + self.num_decode


@dataclass
class SimResult:
    """What a run produced: one record per request, in the harness's format."""

    records: list[RequestRecord]
    duration_s: float
    """From the first arrival to the last request's end."""
    num_instances: int
    num_flips: int
    busy_s: dict[str, float]
    """Seconds each instance spent running steps."""
    placements: list[tuple[str | None, str | None]]
    """(prefill instance, decode instance) of each request, in request order."""

    @classmethod
    def of(cls, reqs: list[SimRequest], name: str, num_instances: int, num_flips: int,
           busy_s: dict[str, float]) -> SimResult:
        """The result of a run over `reqs` (every field set), named `name`."""
        start = min((r.arrival_s for r in reqs), default=0.0)
        end = max((r.finished_s or 0.0 for r in reqs), default=0.0)
        return cls([_record(r, name) for r in reqs], max(end - start, 1e-9), num_instances,
                   num_flips, busy_s, [(r.prefill_id, r.decode_id) for r in reqs])


def _record(r: SimRequest, name: str) -> RequestRecord:
    return RequestRecord(index=r.index, endpoint=name, scheduled_at_s=r.arrival_s,
                         prompt_tokens=r.prompt_tokens, max_tokens=r.output_tokens,
                         sent_at_s=r.arrival_s, first_token_at_s=r.first_token_s,
                         finished_at_s=r.finished_s, output_tokens=r.output_tokens,
                         ok=r.finished_s is not None)
