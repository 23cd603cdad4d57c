"""The output-length predictor contract: what placement and admission read.

A predictor is asked once per request, on its prefill instance, before the decode is
placed (`predict`), and told the true length once the request finishes (`observe`), so it
can learn online. Implementations live in `shuffleinfer.scheduler.predictors` (and later
in `shuffleinfer.predictor`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Bound = Literal["lower", "point", "upper"]
"""Which estimate of a prediction a policy reads (the paper's schedulers use "lower")."""


@dataclass(frozen=True)
class Prediction:
    """A predicted number of output tokens: a bucket and a point estimate inside it.

    The true length is predicted to lie in [lower, upper]; lower <= point <= upper.
    """

    lower: int
    upper: int
    point: int
    bucket: int
    """Index of the length bucket (bucket b covers about b * width .. (b + 1) * width)."""

    def __post_init__(self) -> None:
        if not 0 <= self.lower <= self.point <= self.upper or self.bucket < 0:
            raise ValueError(f"inconsistent prediction {self}")

    def tokens(self, bound: Bound) -> int:
        """The estimate a policy configured with `bound` uses."""
        return {"lower": self.lower, "point": self.point, "upper": self.upper}[bound]


class OutputLengthPredictor(ABC):
    """Predicts how many tokens a request will generate."""

    @abstractmethod
    def predict(self, prompt_token_ids: Sequence[int], max_tokens: int) -> Prediction:
        """Called once per request after tokenisation, before its decode is placed; never
        predicts more than `max_tokens`."""

    @abstractmethod
    def observe(self, prompt_token_ids: Sequence[int], max_tokens: int,
                true_output_tokens: int) -> None:
        """Called once when a request finishes normally, with the tokens it generated."""
