"""The cluster's one output-length learner, kept by the global scheduler.

A request's life here: its `PredictorInput` arrives with `schedule_prefill`; its
prediction (made on the prefill instance) arrives with `schedule_decode`, or, if that
prediction was late or failed, `fallback` gives the prior's instead (counted); when the
request finishes with its true length, `finish` scores the prediction (bucket hit,
absolute error) and teaches the learner. Prediction sites get the learner's newer states
through `snapshot_if_newer`; `save` keeps the learned state across restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shuffleinfer.scheduler.prediction import OutputLengthPredictor, Prediction, PredictorInput

logger = logging.getLogger(__name__)

SAVE_EVERY = 500
"""Observations between two saves of the learned state."""


@dataclass(frozen=True)
class LearnerStats:
    """Cumulative prediction accuracy and fallbacks, for /metrics."""

    num_fallbacks: int = 0
    """Decodes placed with the prior because the site's prediction was late or failed."""
    num_scored: int = 0
    """Finished requests whose prediction was compared with their true length."""
    num_bucket_hits: int = 0
    """... whose true length lay within the predicted [lower, upper]."""
    abs_errors: tuple[int, ...] = ()
    """|point - true length| of scored requests since the last call of `take_stats`."""
    version: int = 0


class Learner:
    """Wraps the learning predictor with scoring, fallbacks, pushes and saving."""

    def __init__(self, predictor: OutputLengthPredictor, state_path: Path | None = None) -> None:
        self.predictor = predictor
        self.state_path = state_path
        self._num_fallbacks = 0
        self._num_scored = 0
        self._num_hits = 0
        self._abs_errors: list[int] = []
        self._since_save = 0

    @classmethod
    def create(cls, name: str, state_path: Path | None = None) -> Learner:
        """The predictor `name`, from `state_path` when that file exists."""
        from shuffleinfer.scheduler.predictors import make_predictor

        predictor = make_predictor(name)
        if state_path is not None and state_path.exists() and hasattr(predictor, "load"):
            predictor = type(predictor).load(state_path)  # type: ignore[attr-defined]
            logger.info("predictor state loaded from %s", state_path)
        return cls(predictor, state_path)

    @property
    def version(self) -> int:
        return int(getattr(self.predictor, "version", 0))

    def fallback(self, request: PredictorInput) -> Prediction:
        """The prior's prediction, for a request whose own prediction did not come."""
        self._num_fallbacks += 1
        prior = getattr(self.predictor, "prior", self.predictor)
        return prior.predict(request)

    def finish(self, request: PredictorInput, prediction: Prediction | None,
               num_output_tokens: int) -> None:
        """Called once per request that ended normally, with its true output length."""
        if prediction is not None:
            self._num_scored += 1
            self._num_hits += prediction.lower <= num_output_tokens <= prediction.upper
            self._abs_errors.append(abs(prediction.point - num_output_tokens))
        try:
            self.predictor.observe(request, num_output_tokens)
        except ValueError as e:
            logger.warning("predictor could not learn from a request: %s", e)
            return
        self._since_save += 1
        if self._since_save >= SAVE_EVERY:
            self.save()

    def snapshot_if_newer(self, version: int) -> Any | None:
        """The learner's state for prediction sites, or None if they have `version`."""
        snapshot = getattr(self.predictor, "snapshot", None)
        if snapshot is None or self.version <= version:
            return None
        return snapshot()

    def save(self) -> None:
        """Write the learned state to `state_path` (if configured)."""
        save = getattr(self.predictor, "save", None)
        if self.state_path is None or save is None:
            return
        try:
            save(self.state_path)
            self._since_save = 0
        except OSError as e:
            logger.warning("could not save the predictor to %s: %s", self.state_path, e)

    def take_stats(self) -> LearnerStats:
        """Cumulative counts, and the absolute errors scored since the previous call."""
        errors, self._abs_errors = tuple(self._abs_errors), []
        return LearnerStats(self._num_fallbacks, self._num_scored, self._num_hits, errors,
                            self.version)
