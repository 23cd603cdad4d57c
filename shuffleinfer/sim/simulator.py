"""A discrete-event simulator of a ShuffleInfer cluster (or of colocated vLLM instances)
that runs the same policy objects as the real scheduler.

A request's life here, disaggregated:
  arrival -> prefill placement (policy over the prefill instances' views) -> the
  instance's queue (order policy) -> chunked prefill steps -> first token -> output length
  predicted (an oracle of given accuracy, or a real predictor) -> decode placement
  (policy over the decode instances' views) -> KV hand-over (cost model) -> admission
  (policy) on the decode instance -> decode steps -> end.
Colocated: arrival -> placement -> one engine does both, prompt chunks and decodes in the
same steps (vLLM's chunked prefill).

The views the placement policies see are the cluster monitor's: refreshed from every
instance every `monitor_interval_s`, plus the scheduler's own placements since (as
`GlobalScheduler` counts them). At each monitor tick the flip policy may move an
instance (through the same `Roster` the runtime uses). Deterministic for a given seed.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from benchmarks.records import TraceRequest
from shuffleinfer.protocol import InstanceLoad
from shuffleinfer.scheduler.policies.admission import make_admission_policy
from shuffleinfer.scheduler.policies.flip import make_flip_policy
from shuffleinfer.scheduler.policies.placement import (
    InstanceView,
    PlacementConfig,
    PlacementRequest,
    is_heavy,
    make_placement_policy,
)
from shuffleinfer.scheduler.policies.prefill_order import (
    PrefillOrderConfig,
    make_prefill_order_policy,
)
from shuffleinfer.scheduler.roles import Roster
from shuffleinfer.sim.config import SimConfig, SimResult
from shuffleinfer.sim.cost import LinearCost
from shuffleinfer.sim.instance import SimInstance
from shuffleinfer.sim.oracle import OraclePredictor
from shuffleinfer.sim.request import SimRequest, sim_requests
from shuffleinfer.sim.views import ViewBoard

_STEP_END, _HANDOVER_DONE, _MONITOR = range(3)

Side = Literal["both", "prefill", "decode"]
"""Which instances a `Simulator` runs: all of them, or one side of a cluster split over
two processes (`split.py`)."""


class Simulator:
    """One run over a list of requests."""

    def __init__(self, config: SimConfig, cost: LinearCost, name: str = "sim",
                 side: Side = "both") -> None:
        """`side`: "prefill" or "decode" runs only those instances, for `split.py` (a
        disaggregated cluster without flips); "both" the whole cluster."""
        if side != "both" and (config.colocated or config.flip_policy != "never"):
            raise ValueError("only a disaggregated cluster without flips runs one side "
                             "at a time")
        self.config = config
        self.cost = cost
        self.name = name
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        c = config
        placement = PlacementConfig(heavy_threshold_tokens=c.heavy_threshold_tokens)
        self.placement = placement
        self.prefill_placer = make_placement_policy(c.prefill_policy, placement, self.rng)
        # A stream of its own, so that the decode side draws the same whether or not
        # the prefill side runs in the same process.
        self.decode_placer = make_placement_policy(c.decode_policy, placement,
                                                   random.Random(f"decode:{c.seed}"))
        self.oracle = OraclePredictor(c.oracle_accuracy, c.bucket_width, c.seed)
        order = make_prefill_order_policy(c.prefill_order,
                                          PrefillOrderConfig(sched_window=c.sched_window))
        admission = make_admission_policy(c.admission)

        def instance(instance_id: str, colocated: bool = False) -> SimInstance:
            return SimInstance(instance_id, chunk_size=c.chunk_size,
                               kv_capacity_tokens=c.kv_capacity_tokens, cost=cost,
                               order=order, admission=admission, colocated=colocated,
                               chunked=c.colocated_chunked or not colocated)

        if c.colocated:
            ids = [f"vllm-{i}" for i in range(c.colocated)]
            self.instances = {i: instance(i, colocated=True) for i in ids}
            self.roster = Roster(ids, [], make_flip_policy("never", self._clock), self._clock)
        else:
            prefill = [f"prefill-{i}" for i in range(c.num_prefill) if side != "decode"]
            decode = [f"decode-{i}" for i in range(c.num_decode) if side != "prefill"]
            self.instances = {i: instance(i) for i in prefill + decode}
            self.roster = Roster(prefill, decode,
                                 make_flip_policy(c.flip_policy, self._clock, c.flip),
                                 self._clock)
        self.views = ViewBoard()
        self._flips = c.flip_policy != "never"
        self._held: dict[str, int] = dict.fromkeys(self.instances, 0)
        self._in_flight = 0
        self._outbox: Callable[[SimRequest], None] | None = None
        """The prefill side of a split run: where a request goes once its prefill is
        done (to the decode side), instead of to decode placement here."""
        self._chunking: set[str] = set()
        """Instances running a lone prompt's chunks as one event: the monitor looks at
        them at every tick (a chunk may have ended since, without an event)."""

    def _clock(self) -> float:
        return self.now

    # --- the event loop ---

    def _push(self, at: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (at, self._seq, kind, payload))
        self._seq += 1

    def run(self, requests: Sequence[TraceRequest],
            progress: Callable[[int], None] | None = None) -> SimResult:
        """Simulate `requests` (sorted by arrival) to the end; `progress(n)` is called
        with the number of requests that ended since the last call."""
        reqs = sim_requests(requests)
        self._in_flight = len(reqs)
        with _no_gc():
            self._loop(*self._arrivals(reqs), self._arrive, None, progress)
        return self.result(reqs, self.busy_s())

    def run_prefill_side(self, requests: Sequence[TraceRequest],
                         outbox: Callable[[SimRequest], None]) -> dict[str, float]:
        """The prefill side of a split run (side "prefill"): every request goes to
        `outbox` once its prefill is done (or it ended there, having one token to make),
        in simulated time order; returns each instance's busy seconds."""
        reqs = sim_requests(requests)
        self._in_flight = len(reqs)
        self._outbox = outbox
        with _no_gc():
            self._loop(*self._arrivals(reqs), self._arrive, None, None)
        return self.busy_s()

    def run_decode_side(self, requests: Sequence[TraceRequest],
                        feed: Callable[[list[SimRequest]], list[SimRequest] | None],
                        progress: Callable[[int], None] | None = None) -> list[SimRequest]:
        """The decode side of a split run (side "decode"): `feed(reqs)` returns the next
        of `reqs` whose prefill is done, in simulated time order, their prefill's fields
        set (those that ended there too: `finished_s`), or None when there are no more;
        it blocks until it knows. Each is placed at its first token's time, as
        `_step_end` places it in a whole run. Returns the requests, every field set."""
        reqs = sim_requests(requests)
        self._in_flight = len(reqs)
        with _no_gc():
            self._loop([], [], self._decode_arrival, lambda: feed(reqs), progress)
        return reqs

    def _arrivals(self, reqs: list[SimRequest]) -> tuple[list[float], list[SimRequest]]:
        """Arrival times (with the serving path's delay) and requests, in order."""
        arrivals = sorted(reqs, key=lambda r: r.arrival_s)
        delay = self.config.request_overhead_s
        return [r.arrival_s + delay for r in arrivals], arrivals

    def _loop(self, times: list[float], items: list[SimRequest],
              handle: Callable[[SimRequest], int],
              feed: Callable[[], list[SimRequest] | None] | None,
              progress: Callable[[int], None] | None) -> None:
        """Run events to the end. Arrivals (`handle(items[i])` at `times[i]`, returning
        how many requests it ended) are read in order beside the event heap rather than
        pushed into it: the heap stays as small as the events in flight; at equal times
        an arrival goes first. `feed`, if given, returns more arrivals once these are
        used up (items whose `first_token_s` is their time), or None at the end: no
        event runs before the next arrival is known."""
        self._refresh_views(self.instances)
        self._arrange()
        self._push(self.config.monitor_interval_s, _MONITOR, None)
        events, pop = self._events, heapq.heappop
        times.append(math.inf)
        done_since, next_arrival = 0, 0
        while True:
            t = times[next_arrival]
            if t == math.inf and feed is not None:
                more = feed()
                if more is None:
                    feed = None
                else:
                    times.pop()
                    times += [r.first_token_s or 0.0 for r in more]
                    times.append(math.inf)
                    items += more
                continue
            if t <= (events[0][0] if events else math.inf):
                if t == math.inf:
                    break
                self.now = t
                done_since += handle(items[next_arrival])
                next_arrival += 1
                continue
            at, _, kind, payload = pop(events)
            if kind == _STEP_END:
                instance, version = payload
                if instance.version == version:
                    self.now = at
                    done_since += self._step_end(instance)
                    if progress is not None and done_since >= 1000:
                        progress(done_since)
                        done_since = 0
            elif kind == _HANDOVER_DONE:
                self.now = at
                self._handed_over(payload)
            elif self._in_flight:
                self.now = at
                self._monitor()
                self._push(at + self.config.monitor_interval_s, _MONITOR, None)
        if progress is not None and done_since:
            progress(done_since)

    def busy_s(self) -> dict[str, float]:
        """Seconds each instance (of this side) spent running steps."""
        return {i: x.busy_s for i, x in self.instances.items()}

    def result(self, reqs: list[SimRequest], busy_s: dict[str, float]) -> SimResult:
        """The run's result, from its requests (every field set) and instances' busy
        seconds."""
        with _no_gc():  # a million records would set off full collections
            return SimResult.of(reqs, self.name, self.config.num_instances,
                                self.roster.num_flips, busy_s)

    # --- placement ---

    def _arrange(self) -> None:
        self.views.arrange({role: self.roster.active(role)  # type: ignore[arg-type]
                            for role in ("prefill", "decode")})

    def _arrive(self, req: SimRequest) -> int:
        views = self.views
        instance_id = self.prefill_placer.place(
            PlacementRequest(str(req.index), req.prompt_tokens),
            views.candidates("prefill")).instance_id
        req.prefill_id = instance_id
        v = views[instance_id]
        # Built field by field: _replace costs more, per request.
        views[instance_id] = InstanceView(
            instance_id, v.num_running_reqs + 1, v.num_queued_prompt_tokens + req.prompt_tokens,
            v.num_free_kv_tokens, v.num_heavy_reqs, v.num_light_reqs,
            v.num_predicted_decode_tokens)
        self._held[instance_id] += 1
        instance = self.instances[instance_id]
        instance.enqueue_prompt(req)
        views.dirty.add(instance_id)
        self._wake(instance)
        return 0

    def _wake(self, instance: SimInstance) -> None:
        """A prompt for `instance`: start a step if idle, else cut a long macro step."""
        if instance.current is None:
            self._start(instance)
        elif instance.cut(self.now, prompt=True):
            self._push(instance.current.ends_s, _STEP_END, (instance, instance.version))

    def _start(self, instance: SimInstance) -> None:
        step = instance.start_step(self.now)
        if step is not None:
            self._push(step.ends_s, _STEP_END, (instance, instance.version))
            if step.chunk_ends_s:
                self._chunking.add(instance.instance_id)

    def _step_end(self, instance: SimInstance) -> int:
        prefilled, ended = instance.finish_step()
        self.views.dirty.add(instance.instance_id)
        self._chunking.discard(instance.instance_id)
        for req in ended:
            self._end(req)
        num_ended = len(ended)
        for req in prefilled:
            self._held[instance.instance_id] -= 1
            if req.output_tokens == 1:
                req.finished_s = req.first_token_s
                self._end(req)
                num_ended += 1
            elif self.config.colocated:
                self._held[instance.instance_id] += 1
                req.decode_id = instance.instance_id
                instance.join_running(req)
            else:
                self._to_decode(req)
        if ended:
            instance.admit_decodes()
        self._start(instance)
        return num_ended

    def _end(self, req: SimRequest) -> None:
        if self._outbox is not None:  # ended at its prefill: the decode side records it
            self._outbox(req)
        elif req.decode_id is not None:
            self._held[req.decode_id] -= 1
            if req.prediction is not None:
                self.instances[req.decode_id].count_decode(
                    req.prediction, is_heavy(req.prediction, self.placement), -1)
        self._in_flight -= 1

    def _to_decode(self, req: SimRequest) -> None:
        req.prediction = self.oracle.predict(req.output_tokens, self.config.max_tokens)
        req.handover_s = self.cost.handover_s(req.prompt_tokens)
        if self._outbox is not None:  # the decode side places it
            self._outbox(req)
            self._in_flight -= 1
        else:
            self._place_decode(req)

    def _decode_arrival(self, req: SimRequest) -> int:
        """The decode side of a split run: a request whose prefill is done."""
        if req.finished_s is not None:  # it ended there
            self._in_flight -= 1
            return 1
        self._place_decode(req)
        return 0

    def _place_decode(self, req: SimRequest) -> None:
        """Place a request whose prefill is done (`_to_decode` predicted its length)."""
        assert req.prediction is not None
        decode_id = self.decode_placer.place(
            PlacementRequest(str(req.index), req.prompt_tokens, req.prediction),
            self.views.candidates("decode")).instance_id
        req.decode_id = decode_id
        v = self.views[decode_id]
        heavy = is_heavy(req.prediction, self.placement)
        free = v.num_free_kv_tokens
        self.views[decode_id] = InstanceView(
            decode_id, v.num_running_reqs + 1, v.num_queued_prompt_tokens,
            None if free is None else max(free - req.prompt_tokens - 1, 0),
            v.num_heavy_reqs + heavy, v.num_light_reqs + 1 - heavy,
            v.num_predicted_decode_tokens + req.prediction.point)
        self._held[decode_id] += 1
        self._push(self.now + req.handover_s, _HANDOVER_DONE, req)

    def _handed_over(self, req: SimRequest) -> None:
        assert req.decode_id is not None  # set when it was placed
        instance = self.instances[req.decode_id]
        instance.waiting.append(req)
        self.views.dirty.add(req.decode_id)
        assert req.prediction is not None  # made before placement
        instance.count_decode(req.prediction, is_heavy(req.prediction, self.placement), 1)
        was_idle = instance.current is None
        instance.admit_decodes()
        if was_idle:
            self._start(instance)
        elif instance.cut(self.now):
            assert instance.current is not None
            self._push(instance.current.ends_s, _STEP_END, (instance, instance.version))

    # --- the cluster monitor ---

    def _refresh_views(self, ids: Iterable[str]) -> None:
        instances, now = self.instances, self.now
        self.views.update(instances[i].view(now) for i in ids)

    def _monitor(self) -> None:
        self.views.dirty |= self._chunking
        self._refresh_views(self.views.dirty)
        self.views.dirty.clear()
        if not self._flips:
            return  # nothing flips here but the policy (no admin routes in a simulation)
        loads = {i: InstanceLoad(i, self.roster.role(i), ready=True,
                                 num_running_reqs=x.num_running + len(x.queue),
                                 num_waiting_reqs=len(x.waiting),
                                 kv_cache_usage=1 - x.free_kv_tokens() / x.kv_capacity_tokens,
                                 prefill_queue_delay_s=self._queue_delay(x))
                 for i, x in self.instances.items()}
        if self.roster.on_monitor(loads, self._held) or self.roster.flipping():
            self._arrange()

    def _queue_delay(self, instance: SimInstance) -> float:
        waits = [self.now - r.arrival_s for r in instance.queued.values()
                 if r.prefill_started_s is None]
        return max(waits, default=0.0)


@contextmanager
def _no_gc() -> Iterator[None]:
    """Millions of short-lived objects, no cycles: GC passes would only cost time."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def simulate(requests: Sequence[TraceRequest], config: SimConfig, cost: LinearCost,
             name: str = "sim", progress: Callable[[int], None] | None = None) -> SimResult:
    """Run one simulation (a convenience over `Simulator`)."""
    return Simulator(config, cost, name).run(requests, progress)

