"""An output-length predictor for the simulator that knows the answer, and is right as
often as asked: with probability `accuracy` it predicts the bucket holding the true
length, else a neighbouring bucket (one up or one down, at random, kept in range).
Accuracy 1.0 is a perfect oracle; the paper's classifier had 0.749 at 200-token buckets.
"""

from __future__ import annotations

import random

from shuffleinfer.scheduler.prediction import Prediction


class OraclePredictor:
    """Predicts from the true output length."""

    name = "oracle"

    def __init__(self, accuracy: float = 1.0, width: int = 200, seed: int = 0) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"oracle accuracy must be in [0, 1], got {accuracy}")
        if width < 1:
            raise ValueError(f"bucket width must be >= 1, got {width}")
        self.accuracy = accuracy
        self.width = width
        self.rng = random.Random(seed)
        self._made: dict[tuple[int, int], Prediction] = {}
        """Predictions are immutable and few (one per bucket and max_tokens): built once."""

    def predict(self, true_output_tokens: int, max_tokens: int) -> Prediction:
        last = max(max_tokens - 1, 0) // self.width
        bucket = min(true_output_tokens // self.width, last)
        if self.rng.random() >= self.accuracy and last > 0:
            step = self.rng.choice((-1, 1))
            bucket = bucket + step if 0 <= bucket + step <= last else bucket - step
        made = self._made.get((bucket, max_tokens))
        if made is None:
            lower = bucket * self.width
            upper = min((bucket + 1) * self.width - 1, max_tokens)
            made = self._made[bucket, max_tokens] = Prediction(
                lower=lower, upper=upper, point=(lower + upper) // 2, bucket=bucket)
        return made
