"""The hashed n-gram predictor: features (features.py) into a bucket classifier and a
length regression (model.py), behind the `OutputLengthPredictor` contract.

A request's prediction: the bucket probabilities of its natural length are capped at
max_tokens (the mass of the buckets above moves onto the bucket holding max_tokens); the
most likely bucket gives lower and upper; the point estimate (regression or distribution
median, see `point_rule`) is clipped into it. Until the model has been fitted or has
observed `min_observations` requests it predicts its prior, the running median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shuffleinfer.predictor.config import NgramPredictorConfig
from shuffleinfer.predictor.features import Features, featurize
from shuffleinfer.predictor.model import LengthModel
from shuffleinfer.predictor.state import PredictorState, read_state, write_state
from shuffleinfer.scheduler.prediction import (
    OutputLengthPredictor,
    Prediction,
    PredictorInput,
    check_num_output_tokens,
)
from shuffleinfer.scheduler.predictors import RunningMedian


class NgramPredictor(OutputLengthPredictor):
    """Online output-length predictor on hashed n-grams of the prompt text.

    `predict` reads the current model through one reference, so `apply` (swapping in a
    snapshot from another thread) never mixes two versions; `observe` and `fit` update
    the model in place and are meant for the one learner, from one thread.
    """

    def __init__(self, config: NgramPredictorConfig | None = None) -> None:
        self.config = config or NgramPredictorConfig()
        self.version = 0
        self.num_observed = 0
        self.fitted = False
        self.prior = RunningMedian(self.config)
        self._model = self._new_model()

    def _new_model(self) -> LengthModel:
        c = self.config
        return LengthModel(c.hash_bits, c.num_buckets, c.learning_rate, c.l2)

    @property
    def ready(self) -> bool:
        """Whether predictions come from the model (else from the running-median prior)."""
        return self.fitted or self.num_observed >= self.config.min_observations

    def _bucket_of(self, num_tokens: int) -> int:
        return min(num_tokens // self.config.bucket_width_tokens, self.config.num_buckets - 1)

    def features(self, request: PredictorInput) -> Features:
        """The request's feature vector (what the model reads)."""
        return featurize(request, self.config.hash_bits)

    def bucket_probabilities(self, request: PredictorInput) -> np.ndarray:
        """Probabilities of the buckets 0..(bucket of max_tokens), capped at max_tokens."""
        return self._capped(self._model.bucket_probabilities(self.features(request)),
                            request.max_tokens)

    def _capped(self, p: np.ndarray, max_tokens: int) -> np.ndarray:
        """`p` with the mass of the buckets above max_tokens moved onto its bucket."""
        cap = self._bucket_of(max_tokens)
        capped = p[: cap + 1].copy()
        capped[cap] += p[cap + 1:].sum()
        return capped

    def predict(self, request: PredictorInput) -> Prediction:
        """Called once per request, before its decode is placed; about 0.1-0.3 ms."""
        if not self.ready:
            return self.prior.predict(request)
        model = self._model  # one read: a concurrent `apply` swaps the whole model
        x = self.features(request)
        width, max_tokens = self.config.bucket_width_tokens, request.max_tokens
        capped = self._capped(model.bucket_probabilities(x), max_tokens)
        if self.config.point_rule == "regression":
            estimate = min(max(round(math.expm1(model.log_length(x))), 0), max_tokens)
        else:
            estimate = round(_distribution_median(capped, width, max_tokens))
        if self.config.bucket_rule == "most_likely":
            bucket = int(np.argmax(capped))
        else:
            bucket = min(estimate // width, len(capped) - 1)
        lower = bucket * width
        upper = max_tokens if bucket == len(capped) - 1 else (bucket + 1) * width
        point = min(max(estimate, lower), upper)
        return Prediction(lower=lower, upper=upper, point=point, bucket=bucket)

    def observe(self, request: PredictorInput, num_output_tokens: int) -> None:
        """Called once per finished request, at the learner: one learning step. A length
        equal to max_tokens counts as cut short (its natural length is at least that)."""
        check_num_output_tokens(request, num_output_tokens)
        self._learn(self.features(request), num_output_tokens, request.max_tokens)
        self.prior.add(num_output_tokens)
        self.num_observed += 1
        self.version += 1

    def _learn(self, x: Features, num_output_tokens: int, max_tokens: int) -> None:
        censored = num_output_tokens >= max_tokens
        self._model.update(x, self._bucket_of(num_output_tokens), censored, num_output_tokens)

    def fit(self, inputs: Sequence[PredictorInput], lengths: Sequence[int]) -> None:
        """Fit on labelled requests (`fit_epochs` shuffled passes, seeded), continuing
        from the current weights; afterwards the model predicts from the first request.

        Raises ValueError if the sequences differ in length, are empty, or a length is
        outside [0, max_tokens] of its request.
        """
        if len(inputs) != len(lengths):
            raise ValueError(f"fit got {len(inputs)} inputs but {len(lengths)} lengths")
        if not inputs:
            raise ValueError("fit needs at least one labelled request")
        for request, n in zip(inputs, lengths, strict=True):
            check_num_output_tokens(request, n)
        xs = [self.features(r) for r in inputs]
        rng = np.random.default_rng(self.config.seed)
        for _ in range(self.config.fit_epochs):
            for i in rng.permutation(len(xs)):
                self._learn(xs[i], lengths[i], inputs[i].max_tokens)
        for n in lengths:
            self.prior.add(n)
        self.fitted = True
        self.version += 1

    def snapshot(self, with_optimizer: bool = False) -> PredictorState:
        """The current state as a value (arrays copied). Prediction sites need only the
        weights; `with_optimizer` adds the AdaGrad state, for resuming learning."""
        return PredictorState(
            version=self.version, num_observed=self.num_observed, fitted=self.fitted,
            config=self.config.model_dump(), prior_window=tuple(self.prior.window),
            arrays=self._model.arrays(with_optimizer))

    def apply(self, state: PredictorState) -> bool:
        """Adopt a snapshot of the learner if it is newer than what this holds; returns
        whether it did. Raises ValueError if it was made with another configuration."""
        if state.config != self.config.model_dump():
            differ = sorted(k for k in set(state.config) | set(self.config.model_dump())
                            if state.config.get(k) != self.config.model_dump().get(k))
            raise ValueError(f"predictor state has another configuration ({', '.join(differ)})")
        if state.version <= self.version and self.version > 0:
            return False
        model = self._new_model()
        model.set_arrays(state.arrays)
        prior = RunningMedian(self.config)
        for n in state.prior_window:
            prior.add(n)
        self._model, self.prior = model, prior
        self.version, self.num_observed, self.fitted = (
            state.version, state.num_observed, state.fitted)
        return True

    def save(self, path: Path) -> None:
        """Write the whole state (weights, optimiser, prior, version) to `path` atomically."""
        write_state(self.snapshot(with_optimizer=True), path)

    @classmethod
    def load(cls, path: Path) -> NgramPredictor:
        """A predictor restored from `save`: same configuration, same predictions, and
        learning continues where it stopped."""
        state = read_state(path)
        try:
            config = NgramPredictorConfig(**state.config)
        except ValueError as e:
            raise ValueError(f"{path}: bad predictor configuration: {e}") from None
        predictor = cls(config)
        predictor.apply(state)
        return predictor


def _distribution_median(p: np.ndarray, width: int, max_tokens: int) -> float:
    """Median of a bucket distribution, spreading each bucket's mass evenly over it."""
    cumulative = np.cumsum(p)
    b = int(np.searchsorted(cumulative, 0.5 * cumulative[-1]))
    before = cumulative[b - 1] if b > 0 else 0.0
    lower = b * width
    upper = max_tokens if b == len(p) - 1 else (b + 1) * width
    share = (0.5 * cumulative[-1] - before) / max(float(p[b]), 1e-12)
    return lower + share * (upper - lower)
