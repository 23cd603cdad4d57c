"""One simulation on two cores: the prefill side in a child process, the decode side here.

Without flips, nothing a disaggregated cluster's prefill side does depends on its decode
side: prompts are placed on prefill instances by their own views, and a request leaves
them when its prefill ends, whatever the decode instances are doing. So the prefill
side runs ahead in a child process (forked: it reads the same trace) and streams each
request, as its prefill ends, in simulated time order, to the decode side here. The
decode side places each at its first token's time, exactly as a whole run does inside
the prefill's step end, and runs no event before it knows the next request's time.
Both sides run the same `Simulator` code on their half of the instances, and draw from
the same random streams (decode placement and the oracle draw only on the decode side,
prefill placement only on the prefill side), so a split run gives the whole run's
result, request for request (a test checks it). Anything else (colocated, flips) runs in
one process.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from benchmarks.records import TraceRequest
from shuffleinfer.scheduler.prediction import Prediction
from shuffleinfer.sim.config import SimConfig, SimResult
from shuffleinfer.sim.cost import LinearCost
from shuffleinfer.sim.request import SimRequest
from shuffleinfer.sim.simulator import Simulator, simulate

BATCH = 2048
"""Requests per message from the prefill side: each message costs a pipe write and a
read, so they go in batches."""

_Done = tuple[int, str | None, float | None, float | None, float | None, Prediction | None,
              float]
"""What the decode side learns of a request from the prefill side: index, prefill
instance, prefill start, first token, end (when it ended there), predicted length and
hand-over time (both found on the prefill side, which has time to spare)."""


def splits(config: SimConfig) -> bool:
    """Whether `config` can run split (a disaggregated cluster without flips), and this
    system can fork."""
    return not config.colocated and config.flip_policy == "never" \
        and sys.platform == "linux"


def simulate_in_two(requests: Sequence[TraceRequest], config: SimConfig, cost: LinearCost,
                    name: str = "sim", progress: Callable[[int], None] | None = None
                    ) -> SimResult:
    """`simulate`, on two processes when `splits(config)`, else on one."""
    if not splits(config):
        return simulate(requests, config, cost, name, progress)
    ctx = mp.get_context("fork")
    receiving, sending = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_prefill_side, args=(requests, config, cost, name, sending),
                        name="sim-prefill-side", daemon=True)
    child.start()
    sending.close()
    try:
        busy: dict[str, float] = {}

        def feed(reqs: list[SimRequest]) -> list[SimRequest] | None:
            while True:
                try:
                    message = receiving.recv()
                except EOFError:
                    child.join(10)
                    raise RuntimeError("the simulation's prefill side ended without "
                                       f"finishing (exit code {child.exitcode})") from None
                if isinstance(message, dict):  # the end, with its instances' busy time
                    busy.update(message)
                    return None
                if message:
                    return [_learn(reqs[d[0]], d) for d in message]

        decode = Simulator(config, cost, name, side="decode")
        reqs = decode.run_decode_side(requests, feed, progress)
        child.join()
        return decode.result(reqs, busy | decode.busy_s())
    finally:
        receiving.close()
        if child.is_alive():
            child.kill()
            child.join()


def _learn(req: SimRequest, done: _Done) -> SimRequest:
    (_, req.prefill_id, req.prefill_started_s, req.first_token_s, req.finished_s,
     req.prediction, req.handover_s) = done
    return req


def _prefill_side(requests: Sequence[TraceRequest], config: SimConfig, cost: LinearCost,
                  name: str, sending: Connection) -> None:
    """Child process: run the prefill side, sending requests as their prefill ends."""
    batch: list[_Done] = []

    def outbox(req: SimRequest) -> None:
        batch.append((req.index, req.prefill_id, req.prefill_started_s, req.first_token_s,
                      req.finished_s, req.prediction, req.handover_s))
        if len(batch) >= BATCH:
            sending.send(batch)
            batch.clear()

    busy = Simulator(config, cost, name, side="prefill").run_prefill_side(requests, outbox)
    sending.send(batch)
    sending.send(busy)
    sending.close()
