"""The output-length predictor contract: what placement and admission read.

A predictor is asked once per request, on its prefill instance, before the decode is
placed (`predict`), and told the true length once the request finishes (`observe`), so it
can learn online. Both take the same `PredictorInput`, a small picklable summary of the
request (no token ids: observations travel to the global scheduler, which learns).
Simple implementations live in `shuffleinfer.scheduler.predictors`, the learned one in
`shuffleinfer.predictor`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
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
        return getattr(self, bound)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PredictorInput:
    """What a predictor knows about a request: built once after tokenisation.

    Raises ValueError naming the field when a value is malformed (an empty prompt,
    max_tokens < 1, a temperature that is negative or not finite).
    """

    num_prompt_tokens: int
    """Prompt length in tokens (>= 1), after the chat template for chat requests."""
    prompt_text: str
    """A completion's prompt, or the content of a chat request's last user message; may be
    empty when the prompt came as token ids only."""
    max_tokens: int
    """The request's output limit (>= 1); no prediction exceeds it."""
    is_chat: bool = False
    """True for /v1/chat/completions requests."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    has_stop: bool = False
    """True when the request sets stop strings or stop token ids."""

    def __post_init__(self) -> None:
        for name in ("num_prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.num_prompt_tokens < 1:
            raise ValueError(f"empty prompt: num_prompt_tokens must be >= 1, "
                             f"got {self.num_prompt_tokens}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not isinstance(self.prompt_text, str):
            raise ValueError(f"prompt_text must be a string, got {type(self.prompt_text)}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")


class OutputLengthPredictor(ABC):
    """Predicts how many tokens a request will generate."""

    @abstractmethod
    def predict(self, request: PredictorInput) -> Prediction:
        """Called once per request after tokenisation, before its decode is placed; never
        predicts more than `request.max_tokens`."""

    @abstractmethod
    def observe(self, request: PredictorInput, num_output_tokens: int) -> None:
        """Called once when a request finishes (stopped or hit max_tokens), with the number
        of tokens it generated; raises ValueError if that number is negative or above
        `request.max_tokens`."""


def check_num_output_tokens(request: PredictorInput, num_output_tokens: int) -> None:
    """Raise ValueError unless `num_output_tokens` is an integer in [0, max_tokens]."""
    if isinstance(num_output_tokens, bool) or not isinstance(num_output_tokens, int):
        raise ValueError(f"num_output_tokens must be an integer, got {num_output_tokens!r}")
    if not 0 <= num_output_tokens <= request.max_tokens:
        raise ValueError(f"num_output_tokens must be in [0, max_tokens={request.max_tokens}], "
                         f"got {num_output_tokens}")
