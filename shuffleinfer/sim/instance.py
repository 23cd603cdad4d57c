"""One simulated engine: a prefill queue, a decode batch, and the steps it runs.

Every instance can do both kinds of work, like the real engines (roles are the
scheduler's business): a step takes the decodes it runs (each makes one token) plus, from
its prefill queue in the order policy's order, prompt slices up to the chunk size (a
colocated vLLM counts the decodes against the same budget). Its latency comes from the
cost model.

KV: a prompt holds its whole length from its first slice until its prefill ends, a decode
its context. A colocated vLLM starts a new prompt only while its KV has room for it, in
arrival order (vLLM's waiting queue waits at its head); decodes that outgrow the cache are
not preempted here, the cache just admits no new prompt until they end (vLLM would
preempt and recompute, which costs it more).

Steps that only decode are run many at a time ("macro steps") up to the next decode's
end: with B decodes whose context grows by B per step, n steps take
`n * u + c * B * n * (n - 1) / 2` (u: the first step, c: seconds per context token), so
the simulator needs one event per request end rather than one per token. New work that
arrives during a macro step cuts it at the end of the step in progress, as vLLM would take
it at its next step.

Likewise a prompt alone on an instance with no decodes runs all its chunks as one event
(`timing.chunk_ends_s`, `timing.chunks_kept`), which gives the run chunk-by-chunk events
would (a test checks it); the monitor sees the chunks done so far (`view(now)`).

Accounting for the running decodes is by sums, O(1) per event: a decode that joined at
step j has made `1 + step - j` tokens (its first came from the prefill).
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Any

from shuffleinfer.scheduler.policies.admission import (
    AdmissionPolicy,
    AdmissionSnapshot,
    RunningDecode,
)
from shuffleinfer.scheduler.policies.placement import InstanceView
from shuffleinfer.scheduler.policies.prefill_order import (
    PrefillOrderPolicy,
    QueuedPrompt,
    fill_chunk,
)
from shuffleinfer.scheduler.prediction import Prediction
from shuffleinfer.sim.cost import LinearCost
from shuffleinfer.sim.request import SimRequest
from shuffleinfer.sim.timing import Step, chunk_ends_s, chunks_kept, macro_s, steps_within


class _LazyRunning(Sequence[RunningDecode]):
    """The running decodes as the admission policy sees them, built only if it looks
    (greedy and reserve_static never do)."""

    def __init__(self, instance: SimInstance) -> None:
        self._instance = instance
        self._items: list[RunningDecode] | None = None

    def _list(self) -> list[RunningDecode]:
        if self._items is None:
            self._items = list(self._instance.running_views())
        return self._items

    def __len__(self) -> int:
        return len(self._list())

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __iter__(self) -> Iterator[RunningDecode]:
        return iter(self._list())


class SimInstance:
    """A simulated engine."""

    lone_prompt_as_one_event = True
    """False: a lone prompt's chunks are one event each (what the test compares with)."""

    def __init__(self, instance_id: str, *, chunk_size: int, kv_capacity_tokens: int,
                 cost: LinearCost, order: PrefillOrderPolicy, admission: AdmissionPolicy,
                 colocated: bool = False, chunked: bool = True) -> None:
        self.instance_id = instance_id
        self.chunk_size = chunk_size
        self.kv_capacity_tokens = kv_capacity_tokens
        self.cost = cost
        self.order = order
        self.admission = admission
        self.colocated = colocated
        self.chunked = chunked
        """False: prompts run whole, in steps without decodes (vLLM before chunked
        prefill); `chunk_size` is then the step's token budget."""
        self.queue: dict[int, QueuedPrompt] = {}
        """Waiting prompts in arrival order (dicts keep insertion order)."""
        self.queued: dict[int, SimRequest] = {}
        self._started: set[int] = set()
        """Queued prompts with a chunk done already (the order policy runs them first)."""
        self._queued_tokens = 0
        self._arrival_seq = 0
        self.waiting: list[SimRequest] = []
        self._joining: list[SimRequest] = []
        """Admitted during a step: they decode from the step after it."""
        self._joining_tokens = 0
        self._running: list[tuple[int, int, SimRequest]] = []  # (finish step, index, req)
        self.step = 0
        self._sum_prompt = 0
        self._sum_join = 0
        self._prompts_held = 0
        """Whole lengths of the prompts whose prefill has started and not ended."""
        self.current: Step | None = None
        self.version = 0
        """Bumped whenever the scheduled end of the current step changes."""
        self.busy_s = 0.0
        self.num_heavy = 0
        self.num_light = 0
        self._sum_point = 0
        """Predicted output of the decodes handed to it (waiting or running)."""

    # --- load, as the monitor and the policies see it ---

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def context_tokens(self) -> int:
        """Summed context of the running decodes (what they hold in KV)."""
        b = len(self._running)
        return self._sum_prompt + b * (1 + self.step) - self._sum_join

    def free_kv_tokens(self) -> int:
        held = self.context_tokens() + self._joining_tokens + self._prompts_held
        return max(self.kv_capacity_tokens - held, 0)

    def count_decode(self, prediction: Prediction, heavy: bool, sign: int) -> None:
        """A predicted decode was handed over (+1) or ended (-1)."""
        self.num_heavy += sign * heavy
        self.num_light += sign * (not heavy)
        self._sum_point += sign * prediction.point

    def predicted_remaining_tokens(self) -> int:
        """Predicted output still to come (in sum: a decode past its prediction offsets
        others' remainders, which keeps this O(1))."""
        made = len(self._running) * (1 + self.step) - self._sum_join
        return max(self._sum_point - made, 0)

    def view(self, now: float) -> InstanceView:
        """What the cluster monitor reports of this instance (its load at `now`)."""
        b = len(self._running)
        made = b * (1 + self.step) - self._sum_join
        held = self._sum_prompt + made + self._joining_tokens + self._prompts_held
        queued = self._queued_tokens
        step = self.current
        if step is not None and step.chunk_ends_s:  # a lone prompt's chunks done so far
            queued -= self.chunk_size * bisect_right(step.chunk_ends_s, now, 0,
                                                     len(step.chunk_ends_s) - 1)
        return InstanceView(self.instance_id, b + len(self.queue) + len(self.waiting),
                            queued, max(self.kv_capacity_tokens - held, 0),
                            self.num_heavy, self.num_light, max(self._sum_point - made, 0))

    def running_views(self) -> Iterator[RunningDecode]:
        for _, _, r in self._running:
            made = 1 + self.step - r.join_step
            point = r.prediction.point if r.prediction else 0
            yield RunningDecode(str(r.index), r.prompt_tokens + made, max(point - made, 0))

    # --- work arriving ---

    def enqueue_prompt(self, req: SimRequest) -> None:
        self.queue[req.index] = QueuedPrompt(str(req.index), self._arrival_seq,
                                             req.prompt_tokens)
        self.queued[req.index] = req
        self._arrival_seq += 1
        self._queued_tokens += req.prompt_tokens

    def admit_decodes(self) -> None:
        """Let the admission policy start waiting decodes (called when one arrives and
        after steps that freed KV)."""
        if not self.waiting:
            return
        waiting = [r.waiting_view() for r in self.waiting]
        free = self.free_kv_tokens()
        decision = self.admission.schedule(AdmissionSnapshot(waiting, _LazyRunning(self), free))
        admitted = set(decision.admit)
        if not admitted and not self._running and not self._joining:
            admitted = {waiting[0].req_id}  # an idle engine never waits for an estimate
        if admitted:
            keep = []
            for r in self.waiting:
                if str(r.index) not in admitted:
                    keep.append(r)
                elif self.current is None:
                    self.join_running(r)
                else:
                    self._joining.append(r)
                    self._joining_tokens += r.prompt_tokens + 1
            self.waiting = keep

    def join_running(self, req: SimRequest) -> None:
        """`req` decodes from the next step on (its first token is made)."""
        req.join_step = self.step
        finish = self.step + req.output_tokens - 1
        heapq.heappush(self._running, (finish, req.index, req))
        self._sum_prompt += req.prompt_tokens
        self._sum_join += req.join_step

    # --- steps ---

    def start_step(self, now: float) -> Step | None:
        """Plan the next step (or macro step) from `now`; None when there is no work."""
        if not self.queue:  # decodes only (or nothing)
            return self._start_decodes(now) if self._running else self._idle()
        if not self.chunked:
            return self._start_whole_prompts(now)
        if (len(self.queue) == 1 and self.lone_prompt_as_one_event and not self._running
                and not self.waiting):
            step = self._start_lone_prompt(now)
            if step is not None:
                return step
        budget = self.chunk_size - (len(self._running) if self.colocated else 0)
        slices: list[tuple[SimRequest, int]] = []
        tokens, attn = 0, 0.0
        if self.queue and budget > 0:
            candidates = self._candidates(budget)
            if len(candidates) > 1:  # (one has no order to find)
                candidates = self.order.order(candidates)
            for s in fill_chunk(candidates, budget):
                index = int(s.req_id)
                done = self.queue[index].num_computed_tokens
                slices.append((self.queued[index], s.num_tokens))
                tokens += s.num_tokens
                attn += s.num_tokens * (done + s.num_tokens)
        if not slices:
            return self._start_decodes(now) if self._running else self._idle()
        step = Step(now, now + self.cost.step_s(tokens, attn, len(self._running),
                                                 self.context_tokens()),
                     1, 0.0, 0.0, tuple(slices))
        for req, _ in slices:
            if req.prefill_started_s is None:
                req.prefill_started_s = now
                self._prompts_held += req.prompt_tokens
        self.current = step
        self.version += 1
        return step

    def _start_lone_prompt(self, now: float) -> Step | None:
        """All the chunks of the only queued prompt as one step (None when it has one
        chunk left). Each chunk takes what a step of that chunk alone would take."""
        ((index, prompt),) = self.queue.items()
        size, left = self.chunk_size, prompt.num_remaining_tokens
        if left <= size:
            return None
        ends = chunk_ends_s(self.cost, now, size, prompt.num_computed_tokens, left,
                            self.context_tokens())
        req = self.queued[index]
        step = self.current = Step(now, ends[-1], len(ends), slices=((req, left),),
                                   chunk_ends_s=ends)
        if req.prefill_started_s is None:
            req.prefill_started_s = now
            self._prompts_held += req.prompt_tokens
        self.version += 1
        return step

    def _start_whole_prompts(self, now: float) -> Step | None:
        """Prefill first, unchunked: the waiting prompts that fit the budget (and KV), whole,
        in order, in a step of their own; the decodes only when no prompt is waiting."""
        slices: list[tuple[SimRequest, int]] = []
        tokens = 0
        for prompt in self.order.order(self._candidates(self.chunk_size)):
            if tokens + prompt.num_prompt_tokens > self.chunk_size and slices:
                break
            slices.append((self.queued[int(prompt.req_id)], prompt.num_prompt_tokens))
            tokens += prompt.num_prompt_tokens
        if not slices:
            return self._start_decodes(now) if self._running else self._idle()
        attn = float(sum(n * n for _, n in slices))
        # steps=0: the running decodes make no token in it.
        step = self.current = Step(now, now + self.cost.prefill_s(tokens, attn), 0, 0.0, 0.0,
                                    tuple(slices))
        for req, _ in slices:
            req.prefill_started_s = now
            self._prompts_held += req.prompt_tokens
        self.version += 1
        return step

    def _start_decodes(self, now: float) -> Step:
        """A macro step of the running decodes, up to the next one's end."""
        b = len(self._running)
        first = self.cost.decode_s(b, self.context_tokens())
        growth = self.cost.decode_per_ctx_s * b
        n = self._running[0][0] - self.step  # steps to the next decode's end
        step = self.current = Step(now, now + macro_s(n, first, growth), n, first, growth)
        self.version += 1
        return step

    def _idle(self) -> Step | None:
        """No work: no step (None)."""
        self.current = None
        return None

    def _candidates(self, budget: int) -> list[QueuedPrompt]:
        """The queued prompts the next chunk can take, for the order policy: the started
        ones, then whole windows of arrivals until they hold `budget` tokens. The policy
        ranks started prompts first, then by window, so later windows could not get in;
        leaving them out keeps a long queue from being sorted at every step. A colocated
        instance offers new prompts only while its KV has room for them."""
        window = self.order.config.sched_window
        chosen = [self.queue[i] for i in self._started]
        tokens = sum(p.num_remaining_tokens for p in chosen)
        last_window = None
        room = self.free_kv_tokens() if self.colocated else None
        for index, prompt in self.queue.items():
            if index in self._started:
                continue
            if room is not None:
                if prompt.num_prompt_tokens > room and (chosen or self._running):
                    break  # (an idle engine takes its head prompt whatever its length)
                room -= prompt.num_prompt_tokens
            w = prompt.arrival_seq // window
            if tokens >= budget and w != last_window:
                break
            chosen.append(prompt)
            tokens += prompt.num_remaining_tokens
            last_window = w
        return chosen

    def cut(self, now: float, prompt: bool = False) -> bool:
        """New work arrived at `now` (a prompt, or else a decode): end a macro step at the
        end of the step in progress. Returns True if the step's end moved (the caller
        reschedules it)."""
        step = self.current
        if step is None or step.steps <= 1:
            return False
        if step.chunk_ends_s:
            return self._cut_chunks(step, now, prompt)
        done = steps_within(now - step.started_s, step.first_step_s, step.growth_s)
        keep = min(done + 1, step.steps)
        if keep == step.steps:
            return False
        step.steps = keep
        step.ends_s = step.started_s + macro_s(keep, step.first_step_s, step.growth_s)
        self.version += 1
        return True

    def _cut_chunks(self, step: Step, now: float, prompt: bool) -> bool:
        """New work for a lone prompt's chunks at `now` (see `chunks_kept`)."""
        ((req, tokens),) = step.slices
        keep = chunks_kept(step.chunk_ends_s, now, self.chunk_size, tokens, prompt)
        if keep is None:
            return False
        step.steps, step.slices = keep, ((req, keep * self.chunk_size),)
        step.chunk_ends_s = step.chunk_ends_s[:keep]
        step.ends_s = step.chunk_ends_s[-1]
        self.version += 1
        return True

    def finish_step(self) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the current step at its end: (prompts that got their first token, decodes
        that ended). Prompts are taken off the queue; decodes off the batch."""
        step = self.current
        assert step is not None  # only called for a scheduled step
        self.busy_s += step.ends_s - step.started_s
        prefilled = []
        for req, n in step.slices:
            queued = self.queue[req.index]
            self._queued_tokens -= n
            if queued.num_computed_tokens + n >= req.prompt_tokens:
                del self.queue[req.index], self.queued[req.index]
                self._started.discard(req.index)
                self._prompts_held -= req.prompt_tokens
                req.first_token_s = step.ends_s
                prefilled.append(req)
            else:
                self.queue[req.index] = QueuedPrompt(queued.req_id, queued.arrival_seq,
                                                     queued.num_prompt_tokens,
                                                     queued.num_computed_tokens + n)
                self._started.add(req.index)
        start_step = self.step
        self.step += step.steps
        ended = []
        while self._running and self._running[0][0] <= self.step:
            finish, _, req = heapq.heappop(self._running)
            req.finished_s = step.started_s + macro_s(finish - start_step, step.first_step_s,
                                                       step.growth_s) \
                if step.steps > 1 else step.ends_s
            self._sum_prompt -= req.prompt_tokens
            self._sum_join -= req.join_step
            ended.append(req)
        self.current = None
        if self._joining:
            for req in self._joining:
                self.join_running(req)
            self._joining, self._joining_tokens = [], 0
        return prefilled, ended
