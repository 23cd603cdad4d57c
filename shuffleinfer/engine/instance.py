"""One vLLM engine playing a role: prefill, decode, or both (colocated, the baseline).

Life of a request across two instances:
1. `prefill(req)` on a prefill instance runs the prompt in chunks of `chunk_size` tokens
   (vLLM's chunked prefill with `max_num_batched_tokens = chunk_size`), samples the first
   token and, if more tokens are wanted, leaves the KV cache under a lease in the
   connector. It returns the first token and the lease's `kv_transfer_params`.
2. `decode(req, prefill)` on a decode instance submits prompt + first token with those
   params; the connector pulls the KV, and vLLM computes only the new positions. Deltas
   stream back to the caller as they come.
Roles are a matter of which method is called: every engine loads the same connector with
`kv_role="kv_both"`, so an instance can change role without restarting (`set_role` only
changes what it reports).
Prompts wait in the instance's own `PrefillQueue` (policy order, about one chunk ahead of
the engine); decodes wait in its `DecodeGate` (admission policy) before the engine sees
them. Both follow the engine's steps through its stat logger. An abort reaches a request
wherever it is: waiting in the queue or the gate (it leaves without the engine ever
running it), or in the engine (vLLM frees its blocks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from shuffleinfer.engine import sampling
from shuffleinfer.engine.decode_gate import DecodeGate
from shuffleinfer.engine.prefill_queue import AbortedWhileWaiting, PrefillQueue
from shuffleinfer.engine.stats import EngineStatsCollector
from shuffleinfer.kv.scheduler_side import release_lease
from shuffleinfer.predictor.site import PredictionSite, SiteStats
from shuffleinfer.protocol import (
    GenerateRequest,
    InstanceLoad,
    KVTransferStats,
    PrefillResult,
    TokenDelta,
)
from shuffleinfer.scheduler.policies.admission import make_admission_policy
from shuffleinfer.scheduler.policies.placement import PlacementConfig, is_heavy
from shuffleinfer.scheduler.policies.prefill_order import (
    PrefillOrderConfig,
    make_prefill_order_policy,
)
from shuffleinfer.scheduler.predictors import make_predictor

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "colocated"]

_ABORTS_KEPT = 4096
"""Aborts remembered for requests not waiting here: Ray does not order an async actor's
calls, so an abort can overtake the call it aborts, or land as a request is let in."""


@dataclass(frozen=True)
class InstanceSpec:
    """Everything an instance needs to build its engine (derived from the serve config)."""

    instance_id: str
    role: Role
    model: str
    chunk_size: int
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    kv_host: str | None = "127.0.0.1"
    """Where the KV server binds; None: this node's own address (multi-node clusters)."""
    kv_advertise_host: str | None = None
    kv_port: int = 0
    """KV server port; 0: a free port on the instance's node, picked when it starts."""
    kv_lease_s: float = 30.0
    kv_transport: str = "auto"
    """KV hand-over wire (auto, tcp, shm, nccl); see shuffleinfer/kv."""
    kv_overlap: bool = True
    """Stage each prefill chunk's KV as it completes (shuffleinfer/kv/staging.py)."""
    kv_auth_token: str | None = None
    """Shared secret every KV request must carry; None: no check."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    predictor: str | None = None
    """Output-length predictor run beside each prefill (a registry name); None: none."""
    prefill_order: str = "fcfs"
    """Order of the instance's prefill queue (fcfs, sjf, ljf)."""
    sched_window: int = 16
    """Prompts are reordered within windows of this many arrivals."""
    admission: str = "greedy"
    """Decode admission policy (greedy, reserve_static, reserve_dynamic)."""
    heavy_threshold_tokens: int = 128
    """A decode predicted to output more than this is heavy (as the scheduler counts)."""


@dataclass(frozen=True)
class EngineInfo:
    """Facts about a started engine the api needs."""

    instance_id: str
    max_model_len: int
    kv_address: tuple[str, int]


def build_engine_args(spec: InstanceSpec) -> Any:
    """vLLM engine args for an instance: the user's pass-through args win, except the
    connector and the chunk size, which are how ShuffleInfer works."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    kv_config = KVTransferConfig(
        kv_connector="ShuffleKVConnector",
        kv_connector_module_path="shuffleinfer.kv.connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "host": spec.kv_host,
            "advertise_host": spec.kv_advertise_host or spec.kv_host,
            "port": spec.kv_port,
            "lease_s": spec.kv_lease_s,
            "transport": spec.kv_transport,
            "overlap": spec.kv_overlap,
            "auth_token": spec.kv_auth_token,
        },
    )
    args: dict[str, Any] = {
        "model": spec.model,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "enable_chunked_prefill": True,
        "max_num_batched_tokens": spec.chunk_size,
        "disable_log_stats": False,
        "enable_log_requests": False,
    }
    args.update(spec.engine_args)
    args["kv_transfer_config"] = kv_config
    args["max_num_batched_tokens"] = spec.chunk_size
    return AsyncEngineArgs(**args)


def resolve_kv_address(spec: InstanceSpec) -> InstanceSpec:
    """Fill in what only the instance's own node knows: its address (when `kv_host` is
    None) and a free port (when `kv_port` is 0). A wildcard bind is advertised under the
    node's address, so peers on other nodes can dial it."""
    from vllm.utils.network_utils import get_ip

    host = spec.kv_host or get_ip()
    advertise = spec.kv_advertise_host or (get_ip() if host in ("0.0.0.0", "::") else host)
    port = spec.kv_port or free_port(host)
    return dataclasses.replace(spec, kv_host=host, kv_advertise_host=advertise, kv_port=port)


def free_port(host: str) -> int:
    """A port the OS considers free on `host` now (the engine binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EngineInstance:
    """An AsyncLLM plus the role-specific request paths; a Ray actor wraps it 1:1."""

    def __init__(self, spec: InstanceSpec, node_id: str | None = None) -> None:
        self.spec = spec
        self.node_id = node_id
        self._engine: Any = None
        self._info: EngineInfo | None = None
        self._stats = EngineStatsCollector(on_step=self._on_step)
        self._num_inflight = 0
        """Prefill and decode calls running here (waiting their turn or in the engine)."""
        self._aborted: OrderedDict[str, None] = OrderedDict()
        order = make_prefill_order_policy(spec.prefill_order,
                                          PrefillOrderConfig(sched_window=spec.sched_window))
        self._queue = PrefillQueue(order, spec.chunk_size)
        self._gate = DecodeGate(make_admission_policy(spec.admission))
        self._placement = PlacementConfig(heavy_threshold_tokens=spec.heavy_threshold_tokens)
        self._site = PredictionSite(make_predictor(spec.predictor) if spec.predictor else None)

    async def start(self) -> EngineInfo:
        """Build the engine (loads the model; about 30 s on CPU). Called at launch, and
        again after Ray restarted a dead instance; a started engine is left as it is."""
        from vllm.v1.engine.async_llm import AsyncLLM

        if self._info is not None:
            return self._info
        self.spec = resolve_kv_address(self.spec)
        try:
            self._engine = AsyncLLM.from_engine_args(
                build_engine_args(self.spec), stat_loggers=[self._stats.factory])
        except Exception as e:
            # vLLM's errors do not always pickle; the caller needs a readable reason.
            raise RuntimeError(f"{self.spec.instance_id}: engine failed to start: {e}") from None
        max_len = int(self._engine.model_config.max_model_len)
        cache = self._engine.vllm_config.cache_config
        self._gate.set_capacity(int(cache.num_gpu_blocks or 0), int(cache.block_size))
        logger.info("%s ready (%s, max_model_len %d)", self.spec.instance_id,
                    self.spec.role, max_len)
        host = self.spec.kv_advertise_host or self.spec.kv_host or ""
        self._info = EngineInfo(self.spec.instance_id, max_len, (host, self.spec.kv_port))
        return self._info

    def __repr__(self) -> str:
        # Ray shows this as the actor's name in `ray list actors` and the dashboard.
        return f"EngineInstance({self.spec.instance_id}, {self.spec.role})"

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise RuntimeError(f"{self.spec.instance_id} has not been started")
        return self._engine

    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        """Prefill leg: run the prompt, sample the first token, lease its KV if needed; the
        output length is predicted beside it."""
        result, prediction = await self._site.beside(req, self._prefill(req))
        return dataclasses.replace(result, prediction=prediction)

    def apply_predictor(self, state: Any) -> bool:
        """Called when the learner has a newer model: predict with it from now on."""
        return self._site.apply(state)

    def prediction_stats(self) -> SiteStats:
        """Cumulative prediction outcomes; per-prediction seconds are drained."""
        stats = self._site.stats
        seconds, stats.predict_seconds = stats.predict_seconds, []
        return dataclasses.replace(stats, predict_seconds=seconds)

    async def _prefill(self, req: GenerateRequest) -> PrefillResult:
        engine = self._require_engine()
        wants_decode = req.sampling.max_tokens > 1
        transfer_id = uuid.uuid4().hex if wants_decode else None
        params = sampling.prefill_params(req.sampling, transfer_id)
        num_top = req.sampling.logprobs or 0
        deltas: list[TokenDelta] = []  # none if aborted before its turn: "abort", no lease
        kv_params = None
        num_cached = 0
        try:
            async with self._arrived(req.req_id), \
                    self._queue.admitted(req.req_id, len(req.prompt_token_ids)):
                self._raise_if_aborted(req.req_id)  # as it was let in
                async for out in engine.generate(
                        {"prompt_token_ids": list(req.prompt_token_ids)}, params,
                        request_id=req.req_id):
                    deltas.append(sampling.to_delta(out, num_top))
                    kv_params = out.kv_transfer_params or kv_params
                    num_cached = out.num_cached_tokens or num_cached
        except AbortedWhileWaiting:
            pass
        first = _merge(deltas, prefill_instance=self.spec.instance_id)
        if first.finish_reason == "length" and wants_decode:
            first = dataclasses.replace(first, finish_reason=None)
            if not kv_params:
                logger.warning("%s: no KV lease for %s; the decode will recompute the prompt",
                               self.spec.instance_id, req.req_id)
                self._stats.kv.record_recomputed(len(req.prompt_token_ids))
        else:
            kv_params = None  # finished by its first token: nothing to hand over
        return PrefillResult(first=first, kv_transfer_params=kv_params,
                             num_cached_tokens=num_cached)

    async def decode(self, req: GenerateRequest, prefill: PrefillResult
                     ) -> AsyncIterator[TokenDelta]:
        """Decode leg: continue from prompt + first token, reading the prefill's KV."""
        engine = self._require_engine()
        prompt = list(req.prompt_token_ids) + list(prefill.first.token_ids)
        params = sampling.decode_params(req.sampling, prefill.kv_transfer_params or {})
        num_top = req.sampling.logprobs or 0
        try:
            async with self._arrived(req.req_id), \
                    self._gate.admitted(req.req_id, len(prompt), prefill.prediction) as slot:
                self._raise_if_aborted(req.req_id)  # as it was let in
                async for out in engine.generate({"prompt_token_ids": prompt}, params,
                                                 request_id=req.req_id):
                    delta = sampling.to_delta(out, num_top,
                                              decode_instance=self.spec.instance_id)
                    slot.num_generated += len(delta.token_ids)
                    yield delta
        except AbortedWhileWaiting:  # it never reached the engine: nobody will pull its KV
            if prefill.kv_transfer_params:
                await asyncio.to_thread(release_lease, prefill.kv_transfer_params,
                                        self.spec.kv_auth_token)
            yield _merge([], decode_instance=self.spec.instance_id)  # finish_reason "abort"

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Both legs on this engine, no hand-over (the colocated baseline)."""
        engine = self._require_engine()
        params = sampling.colocated_params(req.sampling)
        num_top = req.sampling.logprobs or 0
        async for out in engine.generate({"prompt_token_ids": list(req.prompt_token_ids)},
                                         params, request_id=req.req_id):
            yield sampling.to_delta(out, num_top, prefill_instance=self.spec.instance_id,
                                    decode_instance=self.spec.instance_id)

    @asynccontextmanager
    async def _arrived(self, req_id: str) -> AsyncIterator[None]:
        """Count a prefill or decode call as running here; one whose abort came first
        raises `AbortedWhileWaiting` at once."""
        self._raise_if_aborted(req_id)
        self._num_inflight += 1
        try:
            yield
        finally:
            self._num_inflight -= 1

    def _raise_if_aborted(self, req_id: str) -> None:
        if req_id in self._aborted:
            del self._aborted[req_id]
            raise AbortedWhileWaiting(req_id)

    async def abort(self, req_id: str) -> bool:
        """Abort a request on this instance (idempotent). True when it was still waiting
        its turn here (in the prefill queue or the decode gate), so the engine never saw
        it (a decode stopped before the engine releases the KV lease it would have
        pulled). A request in the engine is aborted there, which frees its KV blocks."""
        if self._queue.abort(req_id) or self._gate.abort(req_id):
            return True
        # Not here yet, being let in, in the engine, or over: whichever, it stops at the
        # next check (on arrival, on being let in), else in the engine.
        self._aborted[req_id] = None
        while len(self._aborted) > _ABORTS_KEPT:
            self._aborted.popitem(last=False)
        if self._engine is not None:
            await self._engine.abort(req_id)
        return False

    def set_role(self, role: Role) -> None:
        """Called when the instance flips: from now on it reports `role`. Nothing else
        changes: the scheduler decides which legs it gets."""
        logger.warning("%s changes role %s -> %s", self.spec.instance_id, self.spec.role, role)
        self.spec = dataclasses.replace(self.spec, role=role)

    def _on_step(self, scheduler_stats: Any) -> None:
        self._queue.on_step()
        self._gate.on_step(float(scheduler_stats.kv_cache_usage))

    def load(self) -> InstanceLoad:
        """Current load, for the cluster monitor and /health."""
        sched = self._stats.latest
        decodes = list(self._gate.running.values())
        predicted = [s.prediction for s in decodes if s.prediction is not None]
        heavy = sum(is_heavy(p, self._placement) for p in predicted)
        return InstanceLoad(
            instance_id=self.spec.instance_id,
            role="decode" if self.spec.role == "decode" else "prefill",
            ready=self._engine is not None,
            num_waiting_reqs=self._queue.num_waiting + self._gate.num_waiting
            + (sched.num_waiting_reqs if sched else 0),
            num_running_reqs=self._num_inflight,
            num_queued_prompt_tokens=self._queue.num_queued_tokens,
            kv_cache_usage=sched.kv_cache_usage if sched else 0.0,
            node_id=self.node_id,
            pid=os.getpid(),
            num_free_kv_tokens=self._gate.free_kv_tokens(),
            num_heavy_reqs=heavy,
            num_light_reqs=len(predicted) - heavy,
            num_predicted_decode_tokens=sum(s.num_predicted_remaining for s in decodes),
            prefill_queue_delay_s=max(self._queue.recent_delay_s, self._queue.oldest_wait_s()),
        )

    def kv_stats(self) -> KVTransferStats:
        """Cumulative KV hand-over counters; per-transfer seconds are drained."""
        return self._stats.kv_stats()

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
            self._info = None


def _merge(deltas: list[TokenDelta], **instance: str) -> TokenDelta:
    token_ids: tuple[int, ...] = ()
    logprobs = None
    for d in deltas:
        token_ids += d.token_ids
        if d.logprobs is not None:
            logprobs = (logprobs or ()) + d.logprobs
    return TokenDelta(token_ids=token_ids, text="".join(d.text for d in deltas),
                      logprobs=logprobs,
                      finish_reason=deltas[-1].finish_reason if deltas else "abort",
                      **instance)  # type: ignore[arg-type]
