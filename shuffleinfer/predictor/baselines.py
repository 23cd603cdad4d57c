"""The predictors the evaluation compares against, and the one interface it drives them
(and the learned predictor) through: fit on examples, predict one, observe one.

Baselines, each learned incrementally so the same object serves the offline split and
the prequential stream:
- constant median: the median of every length seen;
- linear in prompt length: least squares of length on prompt tokens;
- per-task median: the median of the lengths seen for the example's task. The task is an
  oracle feature: a serving system is not told it; it shows how much the task explains.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from shuffleinfer.predictor.config import NgramPredictorConfig
from shuffleinfer.predictor.learned import NgramPredictor
from shuffleinfer.scheduler.prediction import Prediction, PredictorInput
from shuffleinfer.scheduler.predictors import bucketed


@dataclass(frozen=True)
class Example:
    """A labelled request: what a predictor sees, its task (oracle), its true length."""

    request: PredictorInput
    task: str
    prompt_id: str
    num_output_tokens: int


class EvalPredictor(ABC):
    """What the evaluation drives: `fit` once on training examples (or never, for the
    prequential run), then `predict` before and `observe` after each streamed example."""

    name: str

    @abstractmethod
    def fit(self, examples: Sequence[Example]) -> None:
        """Learn from labelled examples before predicting."""

    @abstractmethod
    def predict(self, example: Example) -> Prediction:
        """The prediction for one example (without looking at its length)."""

    @abstractmethod
    def observe(self, example: Example) -> None:
        """Learn from one finished example."""


class _Median:
    """Median of all values added (kept sorted)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def add(self, value: int) -> None:
        bisect.insort(self.values, value)

    def get(self, default: int) -> int:
        v, n = self.values, len(self.values)
        return default if n == 0 else (v[(n - 1) // 2] + v[n // 2] + 1) // 2


class ConstantMedian(EvalPredictor):
    """Predicts the median of every length seen, whatever the request."""

    name = "constant_median"

    def __init__(self, bucket_width_tokens: int, prior_output_tokens: int = 128) -> None:
        self.width, self.prior, self._median = bucket_width_tokens, prior_output_tokens, _Median()

    def fit(self, examples: Sequence[Example]) -> None:
        """Remember the training lengths."""
        for e in examples:
            self.observe(e)

    def predict(self, example: Example) -> Prediction:
        """The median so far, in its bucket."""
        return bucketed(self._median.get(self.prior), example.request.max_tokens, self.width)

    def observe(self, example: Example) -> None:
        """Add the example's length."""
        self._median.add(example.num_output_tokens)


class LinearInPromptLength(EvalPredictor):
    """Least-squares line of output length on prompt tokens (clipped to [0, max_tokens])."""

    name = "linear_prompt_length"

    def __init__(self, bucket_width_tokens: int, prior_output_tokens: int = 128) -> None:
        self.width, self.prior = bucket_width_tokens, prior_output_tokens
        self._n = self._sx = self._sy = self._sxx = self._sxy = 0.0

    def fit(self, examples: Sequence[Example]) -> None:
        """Accumulate the training sums (the same line as a batch least-squares fit)."""
        for e in examples:
            self.observe(e)

    def predict(self, example: Example) -> Prediction:
        """The line's value at the example's prompt length, in its bucket."""
        x = example.request.num_prompt_tokens
        if self._n == 0:
            point = float(self.prior)
        else:
            variance = self._sxx - self._sx * self._sx / self._n
            covariance = self._sxy - self._sx * self._sy / self._n
            slope = 0.0 if variance <= 1e-9 else covariance / variance
            point = (self._sy - slope * self._sx) / self._n + slope * x
        return bucketed(round(point), example.request.max_tokens, self.width)

    def observe(self, example: Example) -> None:
        """Add the example to the sums."""
        x, y = float(example.request.num_prompt_tokens), float(example.num_output_tokens)
        self._n += 1
        self._sx += x
        self._sy += y
        self._sxx += x * x
        self._sxy += x * y


class PerTaskMedian(EvalPredictor):
    """Median length of the example's task (an oracle feature), else of all lengths."""

    name = "per_task_median"

    def __init__(self, bucket_width_tokens: int, prior_output_tokens: int = 128) -> None:
        self.width, self.prior = bucket_width_tokens, prior_output_tokens
        self._all = _Median()
        self._by_task: dict[str, _Median] = defaultdict(_Median)

    def fit(self, examples: Sequence[Example]) -> None:
        """Remember the training lengths per task."""
        for e in examples:
            self.observe(e)

    def predict(self, example: Example) -> Prediction:
        """The task's median so far, in its bucket."""
        task = self._by_task.get(example.task)
        point = task.get(self.prior) if task is not None else self._all.get(self.prior)
        return bucketed(point, example.request.max_tokens, self.width)

    def observe(self, example: Example) -> None:
        """Add the example's length to its task and to the overall median."""
        self._all.add(example.num_output_tokens)
        self._by_task[example.task].add(example.num_output_tokens)


class LearnedPredictor(EvalPredictor):
    """The hashed n-gram predictor behind the evaluation interface."""

    name = "ngram"

    def __init__(self, config: NgramPredictorConfig) -> None:
        self.predictor = NgramPredictor(config)

    def fit(self, examples: Sequence[Example]) -> None:
        """Offline fit on the training examples."""
        self.predictor.fit([e.request for e in examples],
                           [e.num_output_tokens for e in examples])

    def predict(self, example: Example) -> Prediction:
        """The predictor's prediction."""
        return self.predictor.predict(example.request)

    def observe(self, example: Example) -> None:
        """One online step."""
        self.predictor.observe(example.request, example.num_output_tokens)
