"""Where predictions are made: beside the prefill, on the prefill instance.

A request's life here: `PredictionSite.beside(request, prefill)` starts `predict` in a
worker thread and awaits the prefill; when the prefill is done the prediction is taken if
it is ready (within `grace_s`), else the request goes on without one and the scheduler
falls back to its prior. Either way the prefill's result is never delayed by more than
`grace_s`, and a predictor that raises only costs a counted fallback.

The site never learns: the cluster's one learner (at the global scheduler) sends newer
model states, which `apply` swaps in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shuffleinfer.protocol import GenerateRequest
from shuffleinfer.scheduler.prediction import OutputLengthPredictor, Prediction, PredictorInput

logger = logging.getLogger(__name__)
T = TypeVar("T")


def predictor_input(request: GenerateRequest) -> PredictorInput:
    """The predictor's view of a request (raises ValueError for what it cannot read)."""
    s = request.sampling
    return PredictorInput(num_prompt_tokens=len(request.prompt_token_ids),
                          prompt_text=request.prompt_text, max_tokens=s.max_tokens,
                          is_chat=request.is_chat, temperature=float(s.temperature),
                          has_stop=bool(s.stop))


@dataclass
class SiteStats:
    """Cumulative counts of one prediction site."""

    num_on_time: int = 0
    num_late: int = 0
    """The prefill finished first; the request went on without a prediction."""
    num_failed: int = 0
    """The predictor raised."""
    predict_seconds: list[float] = field(default_factory=list)
    """Wall time of each finished prediction (kept for the last 10,000)."""


class PredictionSite:
    """Runs a read-only predictor next to each prefill."""

    def __init__(self, predictor: OutputLengthPredictor | None, grace_s: float = 0.001) -> None:
        self.predictor = predictor
        self.grace_s = grace_s
        """How long a finished prefill waits for its prediction (the issue's budget: 1 ms)."""
        self.stats = SiteStats()
        # One dedicated thread: predictions are short and must not queue behind other work
        # in the event loop's default executor.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor")

    async def beside(self, request: GenerateRequest,
                     work: Awaitable[T]) -> tuple[T, Prediction | None]:
        """Await `work` (the prefill) while predicting `request`; the prediction is None
        when there is no predictor, it was late, or it failed."""
        if self.predictor is None:
            return await work, None
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(self._executor, self._predict, request)
        try:
            result = await work
        except BaseException:
            task.cancel()
            raise
        if not task.done() and self.grace_s > 0:
            await asyncio.wait([task], timeout=self.grace_s)
        if not task.done():
            self.stats.num_late += 1
            task.add_done_callback(_ignore_result)
            return result, None
        if task.exception() is not None:
            self.stats.num_failed += 1
            logger.warning("prediction of %s failed: %s", request.req_id, task.exception())
            return result, None
        self.stats.num_on_time += 1
        return result, task.result()

    def _predict(self, request: GenerateRequest) -> Prediction:
        assert self.predictor is not None  # checked by the caller; not user input
        started = time.perf_counter()
        prediction = self.predictor.predict(predictor_input(request))
        seconds = self.stats.predict_seconds
        seconds.append(time.perf_counter() - started)
        if len(seconds) > 10_000:
            del seconds[:5_000]
        return prediction

    def apply(self, state: Any) -> bool:
        """Swap in a newer model state from the learner; False if it was not newer."""
        apply = getattr(self.predictor, "apply", None)
        if apply is None:
            return False
        return bool(apply(state))


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieve it so asyncio does not log "never retrieved"
