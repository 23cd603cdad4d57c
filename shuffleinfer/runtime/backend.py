"""The api's `Backend` over a running cluster of Ray actors.

One request through `RayBackend.generate`:
1. ask the scheduler actor for a prefill instance; call its `prefill` (the first token and
   the KV lease come back) and yield the first token at once;
2. tell the scheduler the prefill is done, ask it for a decode instance, and stream that
   instance's deltas straight to the api (a Ray streaming generator; the scheduler never
   sees tokens);
3. in `finally`: if the request did not finish, abort it on both instances and release
   the KV lease nobody will pull; tell the scheduler the request is over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from shuffleinfer.kv.scheduler_side import release_lease
from shuffleinfer.protocol import (
    BackendUnavailableError,
    GenerateRequest,
    HealthReport,
    InstanceLoad,
    KVTransferStats,
    PrefillResult,
    TokenDelta,
)
from shuffleinfer.runtime.stop_boundary import StopBoundary

logger = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 5.0


@dataclass
class ClusterHandles:
    """The actors of a running cluster, by instance id."""

    scheduler: Any
    prefill: dict[str, Any]
    decode: dict[str, Any]

    @property
    def instances(self) -> dict[str, Any]:
        return self.prefill | self.decode


class RayBackend:
    """Orchestrates each request's two legs over the cluster's actors."""

    def __init__(self, handles: ClusterHandles, *, model_name: str, max_model_len: int,
                 tokenizer: Any) -> None:
        self.handles = handles
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self._background: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        sched = self.handles.scheduler
        req_id = request.req_id
        prefill_actor = decode_actor = prefill_ref = None
        prefill: PrefillResult | None = None
        finished = False
        boundary = StopBoundary(request.sampling.stop)
        try:
            prefill_id = await sched.schedule_prefill.remote(
                req_id, len(request.prompt_token_ids))
            prefill_actor = self.handles.instances[prefill_id]
            prefill_ref = prefill_actor.prefill.remote(request)
            prefill = await prefill_ref
            sched.prefill_done.remote(req_id)
            finished = prefill.first.finish_reason is not None
            yield boundary.first(prefill.first)
            if finished:
                return
            decode_id = await sched.schedule_decode.remote(req_id)
            decode_actor = self.handles.instances[decode_id]
            stream = decode_actor.decode.options(num_returns="streaming").remote(
                request, prefill)
            async for ref in stream:
                delta: TokenDelta = boundary.decode(await ref)
                finished = delta.finish_reason is not None
                yield delta
                if boundary.stopped:  # a stop string neither engine could see alone
                    self._spawn(self._abort(req_id, None, None, prefill, decode_actor))
                    return
        except RayActorError as e:
            raise BackendUnavailableError(f"an instance serving {req_id} died: {e}") from e
        finally:
            if not finished:
                self._spawn(self._abort(req_id, prefill_actor, prefill_ref, prefill,
                                        decode_actor))
            sched.finish.remote(req_id)

    async def _abort(self, req_id: str, prefill_actor: Any, prefill_ref: Any,
                     prefill: PrefillResult | None, decode_actor: Any) -> None:
        """Abort both legs; free a KV lease that no decode will pull."""
        try:
            if decode_actor is not None:
                await decode_actor.abort.remote(req_id)
            if prefill is None and prefill_actor is not None:
                await prefill_actor.abort.remote(req_id)
                if prefill_ref is not None:
                    # The prefill may have finished just before the abort reached it.
                    prefill = await prefill_ref
            if prefill is not None and prefill.kv_transfer_params and decode_actor is None:
                await asyncio.to_thread(release_lease, prefill.kv_transfer_params)
        except (RayActorError, ray.exceptions.RayTaskError) as e:
            logger.warning("abort of %s incomplete: %s", req_id, e)

    async def health(self) -> HealthReport:
        async def load(instance_id: str, actor: Any) -> InstanceLoad:
            try:
                return await asyncio.wait_for(actor.load.remote(), _HEALTH_TIMEOUT_S)
            except (RayActorError, TimeoutError):
                role = "prefill" if instance_id in self.handles.prefill else "decode"
                return InstanceLoad(instance_id, role, ready=False)  # type: ignore[arg-type]

        loads = await asyncio.gather(*(load(i, a) for i, a in self.handles.instances.items()))
        return HealthReport(ready=all(x.ready for x in loads), instances=tuple(loads))

    async def kv_stats(self) -> KVTransferStats:
        replies = await asyncio.gather(
            *(actor.kv_stats.remote() for actor in self.handles.instances.values()),
            return_exceptions=True)
        stats = [r for r in replies if isinstance(r, KVTransferStats)]
        for r in replies:
            if isinstance(r, BaseException) and not isinstance(r, RayActorError):
                raise r
        return KVTransferStats(
            num_transfers=sum(s.num_transfers for s in stats),
            num_failures=sum(s.num_failures for s in stats),
            num_bytes=sum(s.num_bytes for s in stats),
            seconds=tuple(x for s in stats for x in s.seconds))
