"""Output-length predictors behind the `OutputLengthPredictor` contract, chosen by name.
`running_median` learns online from finished requests with bounded memory (and is the
learned predictor's prior); `ngram` is the learned predictor of shuffleinfer.predictor."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from shuffleinfer.scheduler.policies.registry import lookup
from shuffleinfer.scheduler.prediction import (
    OutputLengthPredictor,
    Prediction,
    PredictorInput,
    check_num_output_tokens,
)


class PredictorConfig(BaseModel):
    """Parameters of the output-length predictor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket_width_tokens: int = Field(default=200, ge=1, description=(
        "Width of a length bucket; a prediction's lower/upper are its bucket's edges "
        "(the paper: 200)."))
    window_size: int = Field(default=1000, ge=1, description=(
        "How many of the latest finished requests the running median remembers."))
    prior_output_tokens: int = Field(default=128, ge=0, description=(
        "Point estimate before any request has finished."))


def bucketed(point: int, max_tokens: int, bucket_width_tokens: int) -> Prediction:
    """The prediction whose point is `point` (capped at max_tokens), bounded by the edges
    of the bucket holding it, the upper edge capped at max_tokens too."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    point = min(max(point, 0), max_tokens)
    bucket = point // bucket_width_tokens
    lower = bucket * bucket_width_tokens
    upper = min(lower + bucket_width_tokens, max_tokens)
    return Prediction(lower=lower, upper=max(upper, point), point=point, bucket=bucket)


class RunningMedian(OutputLengthPredictor):
    """Median output length of the last `window_size` finished requests, whatever the
    prompt; the prior until the first one finishes."""

    def __init__(self, config: PredictorConfig | None = None) -> None:
        self.config = config or PredictorConfig()
        self._arrivals: deque[int] = deque()
        self._sorted: list[int] = []  # the same values, kept sorted for the median

    @property
    def median(self) -> int:
        """Median of the remembered lengths (rounded up), or the prior if none."""
        values, n = self._sorted, len(self._sorted)
        if n == 0:
            return self.config.prior_output_tokens
        return (values[(n - 1) // 2] + values[n // 2] + 1) // 2

    @property
    def window(self) -> list[int]:
        """The remembered lengths, oldest first (a copy)."""
        return list(self._arrivals)

    def predict(self, request: PredictorInput) -> Prediction:
        """Called per request; O(1) apart from the cap."""
        return bucketed(self.median, request.max_tokens, self.config.bucket_width_tokens)

    def observe(self, request: PredictorInput, num_output_tokens: int) -> None:
        """Called per finished request; O(window_size) at worst (list insert/remove)."""
        check_num_output_tokens(request, num_output_tokens)
        self.add(num_output_tokens)

    def add(self, num_output_tokens: int) -> None:
        """Remember one finished request's length (what `observe` does after checking)."""
        self._arrivals.append(num_output_tokens)
        bisect.insort(self._sorted, num_output_tokens)
        if len(self._arrivals) > self.config.window_size:
            oldest = self._arrivals.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]


def _ngram(config: PredictorConfig | None) -> OutputLengthPredictor:
    """The learned predictor (shuffleinfer.predictor); a plain PredictorConfig's fields
    override its defaults."""
    from shuffleinfer.predictor import NgramPredictor, NgramPredictorConfig

    if config is None or isinstance(config, NgramPredictorConfig):
        return NgramPredictor(config)
    return NgramPredictor(NgramPredictorConfig(**config.model_dump()))


PREDICTORS: dict[str, Callable[[PredictorConfig | None], OutputLengthPredictor]] = {
    "running_median": RunningMedian,
    "ngram": _ngram,
}


def make_predictor(name: str, config: PredictorConfig | None = None) -> OutputLengthPredictor:
    """Build a predictor by name; an unknown name raises ValueError listing the known ones."""
    return lookup(PREDICTORS, name, "predictor")(config)
