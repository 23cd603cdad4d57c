"""Messages that cross process boundaries: api <-> runtime <-> instances.

A request's life cycle, seen through these messages:

1. The api tokenises the HTTP body into a `GenerateRequest` (prompt token ids plus
   `SamplingOptions`) and hands it to a `Backend`.
2. The backend asks the global scheduler for a prefill instance, which runs the prompt in
   fixed-size chunks and returns a `PrefillResult`: the first token (streamed to the client
   at once) and the `kv_transfer_params` that let a decode instance pull the KV cache.
3. The backend asks the scheduler for a decode instance, which continues from prompt plus
   first token and yields `TokenDelta`s straight to the api (never through the scheduler).
4. The last delta carries `finish_reason`; the backend reports completion to the scheduler.

Everything here is a plain dataclass so it pickles through Ray and stays testable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shuffleinfer.scheduler.prediction import Prediction

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling parameters a client may set; mapped 1:1 onto vLLM's SamplingParams."""

    max_tokens: int
    """Maximum number of generated tokens, the first token included (>= 1)."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings; the matched string is not part of the returned text."""
    logprobs: int | None = None
    """Number of top alternatives to return per token; None returns no logprobs at all."""
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class GenerateRequest:
    """One tokenised request, as the api hands it to the backend."""

    req_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingOptions
    prompt_text: str = ""
    """A completion's text prompt, or a chat request's last user message: what the
    output-length predictor reads. Empty when the prompt came as token ids."""
    is_chat: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one sampled token and, if asked, its top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """New output since the previous delta of the same request."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    prefill_instance: str | None = None
    """Set on the delta produced by the prefill leg (the first token)."""
    decode_instance: str | None = None
    """Set on deltas produced by the decode leg."""


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill instance returns: the first token and where its KV cache waits."""

    first: TokenDelta
    kv_transfer_params: dict[str, Any] | None
    """None when no decode is needed (the first token already finished the request)."""
    num_cached_tokens: int = 0
    prediction: Prediction | None = None
    """The output-length prediction made beside the prefill; None if late or failed."""


InstanceState = Literal["active", "draining", "flipping"]
InstanceRole = Literal["prefill", "decode"]


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's load, as its actor reports it to the scheduler."""

    instance_id: str
    role: InstanceRole
    ready: bool
    num_waiting_reqs: int = 0
    num_running_reqs: int = 0
    num_queued_prompt_tokens: int = 0
    kv_cache_usage: float = 0.0
    """Fraction of the engine's KV blocks in use, as of its last step (0 when idle)."""
    node_id: str | None = None
    """The Ray node the instance runs on (None outside Ray)."""
    pid: int | None = None
    """The instance's process (it changes when Ray restarts a dead instance)."""
    state: InstanceState = "active"
    """Whether the scheduler gives it work: active, draining (finishing what it holds, no
    new work) or flipping (draining before it changes role)."""
    num_free_kv_tokens: int | None = None
    """Free KV cache in tokens as of its engine's last step (None before one)."""
    num_heavy_reqs: int = 0
    """Decodes running here whose predicted output is heavy (above the threshold)."""
    num_light_reqs: int = 0
    num_predicted_decode_tokens: int = 0
    """Predicted output tokens its running decodes still have to generate."""
    prefill_queue_delay_s: float = 0.0
    """How long the prompts it started most recently waited in its prefill queue."""


@dataclass(frozen=True)
class TransportStats:
    """Cumulative hand-over counters of one transport ("tcp", "shm", "nccl"; "none" for
    pulls that failed before a transport was chosen)."""

    num_transfers: int = 0
    num_failures: int = 0
    num_bytes: int = 0
    seconds: tuple[float, ...] = ()
    """Duration of each transfer not reported before (drained on read)."""

    def __add__(self, other: TransportStats) -> TransportStats:
        return TransportStats(self.num_transfers + other.num_transfers,
                              self.num_failures + other.num_failures,
                              self.num_bytes + other.num_bytes, self.seconds + other.seconds)


@dataclass(frozen=True)
class KVTransferStats:
    """Cumulative KV hand-over counters of one instance (or, summed, of the cluster)."""

    transports: Mapping[str, TransportStats] = field(default_factory=dict)
    num_expired_leases: int = 0
    """Prefill-side leases that ran out unpulled (their blocks were freed)."""
    num_recomputed_tokens: int = 0
    """Prompt tokens a decode computed itself because their KV did not arrive."""
    num_unauthorized: int = 0
    """KV server requests refused for a missing or wrong cluster token."""
    num_overlapped_blocks: int = 0
    """Prefill-side blocks copied out while their prompt was still prefilling (overlap
    mode); the rest of a staged prompt is copied when the prefill ends."""

    @property
    def num_transfers(self) -> int:
        return sum(t.num_transfers for t in self.transports.values())

    @property
    def num_failures(self) -> int:
        return sum(t.num_failures for t in self.transports.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.num_bytes for t in self.transports.values())

    def __add__(self, other: KVTransferStats) -> KVTransferStats:
        transports = dict(self.transports)
        for name, t in other.transports.items():
            transports[name] = transports.get(name, TransportStats()) + t
        return KVTransferStats(transports, self.num_expired_leases + other.num_expired_leases,
                               self.num_recomputed_tokens + other.num_recomputed_tokens,
                               self.num_unauthorized + other.num_unauthorized,
                               self.num_overlapped_blocks + other.num_overlapped_blocks)


@dataclass(frozen=True)
class PredictionStats:
    """Cumulative output-length prediction counters of the cluster."""

    num_on_time: int = 0
    """Predictions ready when their prefill finished."""
    num_late: int = 0
    """Prefills that finished first: the decode was placed with the prior instead."""
    num_failed: int = 0
    """Predictions that raised (also placed with the prior)."""
    num_scored: int = 0
    """Finished requests whose prediction was compared with their true length."""
    num_bucket_hits: int = 0
    """... whose true length fell within the predicted [lower, upper] bucket."""
    abs_errors: tuple[int, ...] = ()
    """|predicted point - true length| per request scored since the last read."""
    predict_seconds: tuple[float, ...] = ()
    """Wall time of each prediction made since the last read."""
    version: int = 0
    """Number of updates the learner has made (observations and fits)."""


@dataclass(frozen=True)
class HealthReport:
    """Cluster readiness, as /health shows it."""

    ready: bool
    instances: tuple[InstanceLoad, ...]

    @property
    def status(self) -> Literal["ok", "degraded", "unavailable"]:
        """ok: every instance ready; degraded: some are not (dead, restarting), but every
        role still has a ready one, so requests are served; unavailable: a role has
        none (or the report says not ready with no instance to tell)."""
        if self.ready:
            return "ok"
        roles = {x.role for x in self.instances}
        serving = {x.role for x in self.instances if x.ready}
        return "degraded" if roles and serving == roles else "unavailable"


class BackendUnavailableError(RuntimeError):
    """Raised by `Backend.generate` (or its first iteration) when no instance can take the
    request now: none is ready, or the queues are full. The api answers 503 so clients
    retry later; any other exception from the backend becomes a 500."""


class UnknownInstanceError(LookupError):
    """An admin call named an instance the cluster does not have (the api answers 404)."""


class RoleChangeError(RuntimeError):
    """A drain or flip that cannot be done now, e.g. it would leave a role with no
    instance taking work (the api answers 409 with this message)."""


class Backend(Protocol):
    """What the HTTP api needs from the serving runtime (a real cluster or a test fake)."""

    model_name: str
    max_model_len: int
    tokenizer: Any
    """A Hugging Face tokenizer (encode, decode, apply_chat_template)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream the request's output. Closing the iterator early aborts the request on
        every instance that holds it and frees its KV cache."""
        ...

    async def health(self) -> HealthReport:
        """Called by GET /health; ready only when every instance is ready."""
        ...

    async def kv_stats(self) -> KVTransferStats:
        """Called by GET /metrics: KV hand-over counters summed over decode instances."""
        ...

    async def prediction_stats(self) -> PredictionStats:
        """Called by GET /metrics: output-length prediction counters of the cluster."""
        ...

    async def failover_stats(self) -> dict[str, int]:
        """Called by GET /metrics: requests moved off a dead instance since the start, by
        leg ("prefill": prefilled again elsewhere; "decode": continued elsewhere)."""
        ...

    async def instances(self) -> tuple[InstanceLoad, ...]:
        """Called by GET /admin/instances: every instance with its role, state and load."""
        ...

    async def drain(self, instance_id: str) -> InstanceLoad:
        """Stop giving the instance new work; what it holds finishes. Raises
        UnknownInstanceError, or RoleChangeError when it is its role's last active one."""
        ...

    async def resume(self, instance_id: str) -> InstanceLoad:
        """Give a drained instance work again. Raises UnknownInstanceError, or
        RoleChangeError while it is flipping."""
        ...

    async def flip(self, instance_id: str, role: InstanceRole | None = None) -> InstanceLoad:
        """Start changing the instance's role (to `role`, default the other one): it drains,
        then takes the new role without an engine restart. Returns at once with state
        "flipping" (or the finished state if it was already idle). Raises
        UnknownInstanceError, or RoleChangeError (already in that role, already flipping,
        or its role would be left with no active instance)."""
        ...
