"""The global scheduler: decides where each request's prefill and decode run.

A request's life in the request table:
  schedule_prefill -> PREFILLING on a prefill instance (its prompt tokens count as queued
  load there) -> prefill_done -> schedule_decode -> DECODING on a decode instance (counts
  as a running request there) -> finish (removed). A request may finish in any state
  (aborted, failed, or done after its first token).
It only decides and counts: tokens never pass through it. Ray-free; the runtime wraps it
in a one-line actor.

Placement runs here, not on the prefill instances as in the paper: the cluster monitor
(in the api process, every `monitor_interval_ms`) brings every instance's load to
`on_monitor`, and both legs are placed by one object that also counts its own placements
since the last report. Two prefill instances placing decodes at once from the same
broadcast would both pick the emptiest decode instance; one placer never does, and the
same policy object runs here, in the simulator and in tests.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shuffleinfer.protocol import InstanceLoad, InstanceState
from shuffleinfer.scheduler.learner import Learner, LearnerStats
from shuffleinfer.scheduler.policies.flip import FlipConfig, Role, make_flip_policy
from shuffleinfer.scheduler.policies.placement import (
    PREFILL_PLACEMENT_POLICIES,
    InstanceView,
    PlacementConfig,
    PlacementDecision,
    PlacementRequest,
    is_heavy,
    make_placement_policy,
)
from shuffleinfer.scheduler.policies.registry import lookup
from shuffleinfer.scheduler.prediction import Prediction, PredictorInput
from shuffleinfer.scheduler.roles import RoleChange, Roster

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    PREFILLING = "prefilling"
    WAITING_DECODE = "waiting_decode"
    DECODING = "decoding"


@dataclass
class RequestEntry:
    """One in-flight request in the table."""

    req_id: str
    num_prompt_tokens: int
    prefill_id: str
    phase: Phase = Phase.PREFILLING
    decode_id: str | None = None
    prediction: Prediction | None = None
    predictor_input: PredictorInput | None = None


class NoInstanceError(RuntimeError):
    """No instance of the needed role takes work now."""


class GlobalScheduler:
    """Request table plus placement decisions for both legs."""

    def __init__(self, prefill_ids: list[str], decode_ids: list[str],
                 prefill_policy: str = "least_load", decode_policy: str = "least_load",
                 placement_config: PlacementConfig | None = None,
                 rng: random.Random | None = None, learner: Learner | None = None,
                 flip_policy: str = "never", flip_config: FlipConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not prefill_ids or not decode_ids:
            raise ValueError("need at least one prefill and one decode instance")
        lookup(PREFILL_PLACEMENT_POLICIES, prefill_policy, "prefill placement policy")
        self.roster = Roster(prefill_ids, decode_ids,
                             make_flip_policy(flip_policy, clock, flip_config), clock)
        self._reports: dict[str, InstanceLoad] = {}
        self._placed_kv: Counter[str] = Counter()
        self._down: set[str] = set()
        """Instances the cluster monitor did not reach (or that were not ready) last time:
        dead, or restarting; they get no new work until they report again."""
        """KV tokens of decodes placed on each instance since its last report."""
        self._config = placement_config or PlacementConfig()
        rng = rng or random.Random()
        self._prefill_policy = make_placement_policy(prefill_policy, self._config, rng)
        self._decode_policy = make_placement_policy(decode_policy, self._config, rng)
        self._table: dict[str, RequestEntry] = {}
        self.num_fallbacks: Counter[str] = Counter()
        """Placements where the policy fell back from its own rule, by reason."""
        self.learner = learner
        """The cluster's output-length learner (None: decodes are placed unpredicted)."""

    def _views(self, ids: list[str]) -> list[InstanceView]:
        running = dict.fromkeys(ids, 0)
        queued = dict.fromkeys(ids, 0)
        heavy = dict.fromkeys(ids, 0)
        light = dict.fromkeys(ids, 0)
        decode_tokens = dict.fromkeys(ids, 0)
        for e in self._table.values():
            if e.phase is Phase.PREFILLING and e.prefill_id in queued:
                queued[e.prefill_id] += e.num_prompt_tokens
                running[e.prefill_id] += 1
            elif e.phase is Phase.DECODING and e.decode_id in running:
                running[e.decode_id] += 1
                if e.prediction is not None:
                    counts = heavy if is_heavy(e.prediction, self._config) else light
                    counts[e.decode_id] += 1
                    decode_tokens[e.decode_id] += e.prediction.point
        return [InstanceView(i, running[i], queued[i], num_free_kv_tokens=self._free_kv(i),
                             num_heavy_reqs=heavy[i], num_light_reqs=light[i],
                             num_predicted_decode_tokens=decode_tokens[i]) for i in ids]

    def _free_kv(self, instance_id: str) -> int | None:
        report = self._reports.get(instance_id)
        if report is None or report.num_free_kv_tokens is None:
            return None
        return max(report.num_free_kv_tokens - self._placed_kv[instance_id], 0)

    def _candidates(self, role: Role, avoid: Sequence[str] = ()) -> list[str]:
        """Active instances of `role`, less `avoid` (where the request's leg just died):
        those the monitor last reached, or, when it reached none of them (a busy instance
        can miss a tick's timeout), all of them rather than refuse the request."""
        active = [i for i in self.roster.active(role) if i not in avoid]
        ids = [i for i in active if i not in self._down] or active
        if not ids:
            raise NoInstanceError(f"no {role} instance takes work now")
        return ids

    def _decided(self, req_id: str, decision: PlacementDecision) -> str:
        if decision.fallback is not None:
            self.num_fallbacks[decision.fallback] += 1
            logger.info("placement of %s fell back (%s) to %s", req_id, decision.fallback,
                        decision.instance_id)
        return decision.instance_id

    def schedule_prefill(self, req_id: str, num_prompt_tokens: int,
                         predictor_input: PredictorInput | None = None,
                         avoid: Sequence[str] = ()) -> str:
        """Called when a request arrives: pick its prefill instance, not one of `avoid`.
        `predictor_input` is what the learner learns from when the request finishes. A
        request placed again (its prefill instance died) was `finish`ed first."""
        if req_id in self._table:
            raise ValueError(f"request {req_id} is already scheduled")
        decision = self._prefill_policy.place(
            PlacementRequest(req_id, num_prompt_tokens),
            self._views(self._candidates("prefill", avoid)))
        prefill_id = self._decided(req_id, decision)
        self._table[req_id] = RequestEntry(req_id, num_prompt_tokens, prefill_id,
                                           predictor_input=predictor_input)
        return prefill_id

    def prefill_done(self, req_id: str) -> None:
        """Called when the first token is out: the prompt no longer loads the prefill."""
        if (entry := self._table.get(req_id)) is not None:
            entry.phase = Phase.WAITING_DECODE

    def schedule_decode(self, req_id: str, prediction: Prediction | None = None,
                        avoid: Sequence[str] = ()) -> str:
        """Called after prefill_done when more tokens are wanted: pick the decode instance.
        `prediction` (the request's predicted output length) feeds placement and the
        heavy/light counts of the instance it lands on; when it is None (late or failed
        on the prefill instance) the learner's prior stands in."""
        entry = self._table.get(req_id)
        if entry is None:
            raise ValueError(f"request {req_id} is not scheduled")
        if prediction is None and self.learner is not None and entry.predictor_input:
            prediction = self.learner.fallback(entry.predictor_input)
        request = PlacementRequest(req_id, entry.num_prompt_tokens, prediction)
        decision = self._decode_policy.place(request,
                                             self._views(self._candidates("decode", avoid)))
        entry.decode_id = self._decided(req_id, decision)
        self._placed_kv[entry.decode_id] += entry.num_prompt_tokens + 1
        entry.prediction = prediction
        entry.phase = Phase.DECODING
        return entry.decode_id

    def finish(self, req_id: str, num_output_tokens: int | None = None) -> None:
        """Called once when a request ends for any reason (idempotent); with its output
        length when it ended normally (stop or length), which the learner learns from."""
        entry = self._table.pop(req_id, None)
        if (entry is None or num_output_tokens is None or self.learner is None
                or entry.predictor_input is None):
            return
        self.learner.finish(entry.predictor_input, entry.prediction, num_output_tokens)

    def start_learner(self, predictor: str, state_path: Path | None = None) -> None:
        """Called once at launch: build the learner here, where it learns (its arrays must
        be this process's own: arrays that came through Ray's object store are
        read-only)."""
        self.learner = Learner.create(predictor, state_path)

    def predictor_snapshot(self, version: int) -> object | None:
        """The learner's model state if newer than `version` (for prediction sites)."""
        return None if self.learner is None else self.learner.snapshot_if_newer(version)

    def learner_stats(self) -> LearnerStats:
        """Prediction accuracy counters since the start (errors since the last call)."""
        return LearnerStats() if self.learner is None else self.learner.take_stats()

    def save_predictor(self) -> None:
        """Called on shutdown: keep what the learner learned."""
        if self.learner is not None:
            self.learner.save()

    def num_inflight(self) -> dict[str, int]:
        """Requests currently held per instance (prefilling there, or decoding there)."""
        counts = dict.fromkeys(self.roster.ids(), 0)
        for e in self._table.values():
            if e.phase is Phase.PREFILLING:
                counts[e.prefill_id] += 1
            elif e.phase is Phase.DECODING and e.decode_id is not None:
                counts[e.decode_id] += 1
        return counts

    def on_monitor(self, loads: list[InstanceLoad]) -> list[RoleChange]:
        """Called by the cluster monitor with every reachable instance's load: placement
        reads the reported free KV from now on; flips of drained instances finish (the
        caller tells those instances their new role) and the flip policy may start one."""
        for load in loads:
            self._reports[load.instance_id] = load
            self._placed_kv.pop(load.instance_id, None)
        reachable = {x.instance_id: x for x in loads if x.ready}
        self._down = set(self.roster.ids()) - set(reachable)
        return self.roster.on_monitor(reachable, self.num_inflight())

    def roles(self) -> dict[str, tuple[Role, InstanceState]]:
        """Every instance's role and state."""
        return {i: (self.roster.role(i), self.roster.state(i)) for i in self.roster.ids()}

    def drain(self, instance_id: str) -> InstanceState:
        """Admin: no new work for the instance (raises UnknownInstanceError or
        RoleChangeError)."""
        return self.roster.drain(instance_id)

    def resume(self, instance_id: str) -> InstanceState:
        """Admin: a drained instance takes work again."""
        return self.roster.resume(instance_id)

    def flip(self, instance_id: str, role: Role | None = None) -> InstanceState:
        """Admin: drain the instance, then change its role (see `Roster`)."""
        return self.roster.begin_flip(instance_id, role)
