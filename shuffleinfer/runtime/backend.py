"""The api's `Backend` over a running cluster of Ray actors.

One request through `RayBackend.generate`:
1. ask the scheduler actor for a prefill instance; call its `prefill` (the first token and
   the KV lease come back) and yield the first token at once;
2. tell the scheduler the prefill is done, ask it for a decode instance (with the output
   length predicted beside the prefill), and stream that instance's deltas straight to
   the api (a Ray streaming generator; the scheduler never sees tokens);
3. in `finally`: if the request did not finish, abort it on both instances and release
   the KV lease nobody will pull; tell the scheduler the request is over (with its output
   length if it ran to its end, which the cluster's length learner learns from).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayActorError

from shuffleinfer.kv.scheduler_side import release_lease
from shuffleinfer.predictor.site import predictor_input
from shuffleinfer.protocol import (
    BackendUnavailableError,
    GenerateRequest,
    HealthReport,
    InstanceLoad,
    InstanceRole,
    KVTransferStats,
    PredictionStats,
    RoleChangeError,
    TokenDelta,
    UnknownInstanceError,
)
from shuffleinfer.runtime.handles import ClusterHandles
from shuffleinfer.runtime.legs import MAX_FAILOVERS, Legs, continuation
from shuffleinfer.runtime.monitor import (
    LOAD_TIMEOUT_S,
    ClusterMonitor,
    gather_loads,
    with_roles,
)
from shuffleinfer.runtime.stop_boundary import StopBoundary
from shuffleinfer.scheduler.global_scheduler import NoInstanceError
from shuffleinfer.scheduler.prediction import PredictorInput

logger = logging.getLogger(__name__)


def _predictor_input(request: GenerateRequest) -> PredictorInput | None:
    try:
        return predictor_input(request)
    except ValueError as e:  # the predictor cannot read it; the request goes on without
        logger.warning("no output-length prediction for %s: %s", request.req_id, e)
        return None

_WATCH_INTERVAL_S = 2.0

class RayBackend:
    """Orchestrates each request's two legs over the cluster's actors."""

    def __init__(self, handles: ClusterHandles, *, model_name: str, max_model_len: int,
                 tokenizer: Any, predictor_push_s: float | None = None,
                 monitor_interval_s: float = 0.1) -> None:
        self.handles = handles
        self.monitor = ClusterMonitor(handles, monitor_interval_s)
        self._monitor_task: asyncio.Future[None] | None = None
        self.predictor_push_s = predictor_push_s
        """Seconds between model pushes from the learner to the instances (None: never)."""
        self._pushed_version = 0
        self._pusher: asyncio.Future[None] | None = None
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self._background: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Future[None] | None = None
        self._restarting: set[str] = set()
        self.num_engine_restarts = 0
        self.failovers: Counter[str] = Counter()
        """Requests moved off a dead instance, by leg (see `failover_stats`)."""
        """Engines started again after Ray restarted their dead instance."""

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        sched = self.handles.scheduler
        legs = Legs(request)
        finished = False
        reason: str | None = None
        output_ids: list[int] = []
        boundary = StopBoundary(request.sampling.stop)
        self._start_background()
        try:
            first = await self._prefill(legs, _predictor_input(request))
            finished, reason = first.finish_reason is not None, first.finish_reason
            output_ids += first.token_ids
            yield boundary.first(first)
            dead_decodes: list[str] = []
            while not finished:
                try:
                    async for delta in self._decode(legs, dead_decodes):
                        delta = boundary.decode(delta)
                        finished, reason = delta.finish_reason is not None, delta.finish_reason
                        output_ids += delta.token_ids
                        yield delta
                        if boundary.stopped:  # a stop string neither engine could see alone
                            self._spawn(self._abort(legs.settled()))
                            return
                    break  # the stream ended (the api reports one without a finish reason)
                except RayActorError as e:
                    # The decode instance died: go on from the tokens the client has, as
                    # a new request (prompt + output so far) prefilled and decoded on
                    # other instances; its first token is the next one of this stream.
                    if len(dead_decodes) >= MAX_FAILOVERS:
                        raise
                    assert legs.decode_id is not None  # a stream runs on a placed decode
                    dead_decodes.append(legs.decode_id)
                    self._count_failover("decode", legs, e)
                    await sched.finish.remote(legs.request.req_id)
                    legs = Legs(continuation(request, output_ids, len(dead_decodes)))
                    delta = boundary.decode(await self._prefill(legs, None))
                    finished, reason = delta.finish_reason is not None, delta.finish_reason
                    output_ids += delta.token_ids
                    yield delta
                    if boundary.stopped:
                        self._spawn(self._abort(legs.settled()))
                        return
        except RayActorError as e:
            raise BackendUnavailableError(f"an instance serving {request.req_id} died: {e}") \
                from e
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, NoInstanceError):
                raise BackendUnavailableError(str(e.cause)) from None
            raise
        finally:
            if not finished:
                self._spawn(self._abort(legs))
            # Only a request that ran to its end, on the legs it started on, teaches the
            # predictor its length.
            normal = finished and reason in ("stop", "length") and legs.request is request
            sched.finish.remote(legs.request.req_id, len(output_ids) if normal else None)

    async def _prefill(self, legs: Legs, predictor_input: PredictorInput | None) -> TokenDelta:
        """Prefill `legs.request` and return its first token; if the prefill instance dies
        first, prefill it again on another one (up to MAX_FAILOVERS times)."""
        sched = self.handles.scheduler
        req_id = legs.request.req_id
        dead: list[str] = []
        while True:
            legs.prefill_id = await sched.schedule_prefill.remote(
                req_id, len(legs.request.prompt_token_ids), predictor_input, dead)
            legs.prefill_actor = self.handles.instances[legs.prefill_id]
            legs.prefill_ref = legs.prefill_actor.prefill.remote(legs.request)
            try:
                legs.prefill = await legs.prefill_ref
            except RayActorError as e:
                if len(dead) >= MAX_FAILOVERS:
                    raise
                dead.append(legs.prefill_id)
                self._count_failover("prefill", legs, e)
                legs.prefill_actor = legs.prefill_ref = None
                await sched.finish.remote(req_id)  # forget the placement; place it again
                continue
            sched.prefill_done.remote(req_id)
            return legs.prefill.first

    async def _decode(self, legs: Legs, avoid: list[str]) -> AsyncIterator[TokenDelta]:
        """Place `legs.request`'s decode (not on `avoid`) and stream its deltas."""
        assert legs.prefill is not None  # decodes follow their prefill
        legs.decode_id = await self.handles.scheduler.schedule_decode.remote(
            legs.request.req_id, legs.prefill.prediction, avoid)
        legs.decode_actor = self.handles.instances[legs.decode_id]
        stream = legs.decode_actor.decode.options(num_returns="streaming").remote(
            legs.request, legs.prefill)
        async for ref in stream:
            yield await ref

    def _count_failover(self, leg: str, legs: Legs, error: Exception) -> None:
        self.failovers[leg] += 1
        instance = legs.prefill_id if leg == "prefill" else legs.decode_id
        logger.warning("%s instance %s died serving %s (%s); %s", leg, instance,
                       legs.request.req_id, type(error).__name__,
                       "prefilling it again on another" if leg == "prefill" else
                       "continuing it on others from the tokens already sent")

    async def failover_stats(self) -> dict[str, int]:
        return dict(self.failovers)

    async def _abort(self, legs: Legs) -> None:
        """Abort both legs; free the KV lease if no decode was placed to pull it (a decode
        stopped before its engine releases the lease itself)."""
        req_id, prefill = legs.request.req_id, legs.prefill
        try:
            if legs.decode_actor is not None:
                await legs.decode_actor.abort.remote(req_id)
            if prefill is None and legs.prefill_actor is not None:
                # Still queued, it never runs; in the engine, vLLM stops it.
                await legs.prefill_actor.abort.remote(req_id)
                if legs.prefill_ref is not None:
                    # The prefill may have finished just before the abort reached it.
                    prefill = await legs.prefill_ref
            if prefill is not None and prefill.kv_transfer_params and legs.decode_actor is None:
                await asyncio.to_thread(release_lease, prefill.kv_transfer_params,
                                        self.handles.kv_auth_token)
        except (RayActorError, ray.exceptions.RayTaskError) as e:
            logger.warning("abort of %s incomplete: %s", req_id, e)

    def close(self) -> None:
        """Cancel the background tasks (predictor pushes, the instance watcher, aborts).
        Called before the engines are stopped: the watcher would otherwise take an engine
        being shut down for one Ray restarted, and start it again."""
        for task in (self._watcher, self._pusher, self._monitor_task, *self._background):
            if task is not None:
                task.cancel()

    def _start_background(self) -> None:
        if self._pusher is None and self.predictor_push_s is not None:
            self._pusher = asyncio.ensure_future(self._push_predictor_forever())
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_instances_forever())
        if self._monitor_task is None:
            self._monitor_task = asyncio.ensure_future(self.monitor.run_forever())

    async def _watch_instances_forever(self) -> None:
        """Every few seconds, start the engine of any instance that is alive but not
        ready: Ray restarted it after it died (`max_restarts`), and a restarted actor
        comes back with no engine. It rejoins once its engine is up."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            report = await self.health()
            for load in report.instances:
                if load.ready or load.pid is None or load.instance_id in self._restarting:
                    continue  # ready, unreachable (dead or busy starting), or in hand
                self._restarting.add(load.instance_id)
                self._spawn(self._restart_engine(load.instance_id))

    async def _restart_engine(self, instance_id: str) -> None:
        logger.warning("%s was restarted by Ray; starting its engine again", instance_id)
        try:
            await self.handles.instances[instance_id].start.remote()
            self.num_engine_restarts += 1
            logger.warning("%s rejoined", instance_id)
        except (RayActorError, ray.exceptions.RayTaskError) as e:
            logger.error("%s could not start its engine again: %s", instance_id, e)
        finally:
            self._restarting.discard(instance_id)

    async def _push_predictor_forever(self) -> None:
        """Every `predictor_push_s`, send the learner's newer model to every instance (any
        instance may prefill after a flip). A failed push only delays the next version."""
        assert self.predictor_push_s is not None
        while True:
            await asyncio.sleep(self.predictor_push_s)
            try:
                await self.push_predictor()
            except (RayActorError, ray.exceptions.RayTaskError) as e:
                logger.warning("predictor push failed: %s", e)

    async def push_predictor(self) -> int:
        """Send the learner's model to the instances if it is newer than the last one
        sent; returns the version the instances now have."""
        state = await self.handles.scheduler.predictor_snapshot.remote(self._pushed_version)
        if state is not None:
            ref = ray.put(state)
            await asyncio.gather(*(a.apply_predictor.remote(ref)
                                   for a in self.handles.instances.values()))
            self._pushed_version = state.version
        return self._pushed_version

    async def prediction_stats(self) -> PredictionStats:
        """The learner's accuracy counters plus every instance's prediction outcomes."""
        learner = await self.handles.scheduler.learner_stats.remote()
        replies = await self._ask_every_instance("prediction_stats")
        sites = [r for r in replies if not isinstance(r, BaseException)]
        return PredictionStats(
            num_on_time=sum(s.num_on_time for s in sites),
            num_late=sum(s.num_late for s in sites),
            num_failed=sum(s.num_failed for s in sites),
            num_scored=learner.num_scored, num_bucket_hits=learner.num_bucket_hits,
            abs_errors=learner.abs_errors,
            predict_seconds=tuple(x for s in sites for x in s.predict_seconds),
            version=learner.version)

    async def health(self) -> HealthReport:
        self._start_background()
        loads = await with_roles(self.handles, await gather_loads(self.handles))
        return HealthReport(ready=all(x.ready for x in loads), instances=loads)

    async def instances(self) -> tuple[InstanceLoad, ...]:
        return (await self.health()).instances

    async def drain(self, instance_id: str) -> InstanceLoad:
        await _admin(self.handles.scheduler.drain.remote(instance_id))
        return await self._load_of(instance_id)

    async def resume(self, instance_id: str) -> InstanceLoad:
        await _admin(self.handles.scheduler.resume.remote(instance_id))
        return await self._load_of(instance_id)

    async def flip(self, instance_id: str, role: InstanceRole | None = None) -> InstanceLoad:
        await _admin(self.handles.scheduler.flip.remote(instance_id, role))
        await self.monitor.tick()  # an instance that holds nothing flips at once
        return await self._load_of(instance_id)

    async def _load_of(self, instance_id: str) -> InstanceLoad:
        return next(x for x in await self.instances() if x.instance_id == instance_id)

    async def _ask_every_instance(self, method: str) -> list[Any]:
        """`method()` of every instance, or the exception it raised instead; one that is
        dead, restarting (Ray holds calls to it until it is back) or slower than
        LOAD_TIMEOUT_S gives a RayActorError or TimeoutError, so /metrics never waits on
        a dead instance."""
        async def ask(actor: Any) -> Any:
            try:
                return await asyncio.wait_for(getattr(actor, method).remote(),
                                              LOAD_TIMEOUT_S)
            except Exception as e:  # returned, as asyncio.gather(return_exceptions=True)
                return e

        return list(await asyncio.gather(*(ask(a) for a in self.handles.instances.values())))

    async def kv_stats(self) -> KVTransferStats:
        replies = await self._ask_every_instance("kv_stats")
        stats = [r for r in replies if isinstance(r, KVTransferStats)]
        for r in replies:
            if isinstance(r, BaseException) and not isinstance(r, (RayActorError,
                                                                   TimeoutError)):
                raise r
        return sum(stats, KVTransferStats())


async def _admin(call: Any) -> Any:
    """Await a scheduler admin call, raising its own refusal (not Ray's wrapper)."""
    try:
        return await call
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (UnknownInstanceError, RoleChangeError)):
            raise e.cause from None
        raise
