"""The output-length model: two linear models on the same sparse features, learned by
AdaGrad one request at a time (so offline fitting and online updates are one code path).

- a multinomial logistic regression over length buckets (bucket b = lengths
  [b * width, (b + 1) * width), the last bucket open-ended);
- a median regression (absolute loss) on log(1 + length): the median of log(1 + L) is
  log(1 + median L), so its estimate minimises the absolute error in tokens.

A request that hit max_tokens only tells that its natural length is at least that much
(right-censored); both models learn exactly that: the classifier the probability of the
buckets at or above, the regression only if it predicts below.
"""

from __future__ import annotations

import math

import numpy as np

from shuffleinfer.predictor.features import Features

_EPS = 1e-2
"""Initial AdaGrad accumulator: keeps the first steps of a feature at about lr / 0.1."""
_ARRAYS = ("class_weights", "length_weights", "class_sq", "length_sq")


class LengthModel:
    """Bucket classifier + log-length median regression over 2**bits hashed features."""

    def __init__(self, bits: int, num_buckets: int, learning_rate: float,
                 l2: float) -> None:
        if num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
        size = 1 << bits
        self.learning_rate = learning_rate
        self.l2 = l2
        self.class_weights = np.zeros((size, num_buckets), dtype=np.float32)
        self.length_weights = np.zeros(size, dtype=np.float32)
        self.class_sq = np.full((size, num_buckets), _EPS, dtype=np.float32)
        self.length_sq = np.full(size, _EPS, dtype=np.float32)

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickling: arrays that arrive read-only (Ray's object store hands out zero-copy
        read-only buffers) are copied, so a shipped model can still learn."""
        self.__dict__.update(state)
        for name in _ARRAYS:
            array = getattr(self, name)
            if not array.flags.writeable:
                setattr(self, name, array.copy())

    @property
    def num_buckets(self) -> int:
        """Number of length buckets (classes)."""
        return int(self.class_weights.shape[1])

    def bucket_probabilities(self, x: Features) -> np.ndarray:
        """Probability of each bucket for the natural (uncapped) length; shape (buckets,)."""
        logits = x.values @ self.class_weights[x.indices]
        logits -= logits.max()
        p = np.exp(logits)
        return p / p.sum()

    def log_length(self, x: Features) -> float:
        """The median estimate of log(1 + length)."""
        return float(x.values @ self.length_weights[x.indices])

    def update(self, x: Features, bucket: int, censored: bool, length: int) -> None:
        """One AdaGrad step towards a request of `length` tokens in `bucket`; `censored`
        means it was cut by max_tokens, so its natural length is at least that."""
        idx, val = x.indices, x.values
        p = self.bucket_probabilities(x)
        target = np.zeros_like(p)
        if censored:
            tail = p[bucket:]
            target[bucket:] = tail / tail.sum() if tail.sum() > 0 else 1.0 / len(tail)
        else:
            target[bucket] = 1.0
        w = self.class_weights[idx]
        grad = np.outer(val, p - target) + self.l2 * w
        sq = self.class_sq[idx] + grad * grad
        self.class_sq[idx] = sq
        self.class_weights[idx] = w - self.learning_rate * grad / np.sqrt(sq)

        y = math.log1p(length)
        error = self.log_length(x) - y
        if censored and error >= 0:
            return  # predicted at least the censored length: consistent, nothing to learn
        lw = self.length_weights[idx]
        lgrad = val * np.float32(math.copysign(1.0, error)) + self.l2 * lw
        lsq = self.length_sq[idx] + lgrad * lgrad
        self.length_sq[idx] = lsq
        self.length_weights[idx] = lw - self.learning_rate * lgrad / np.sqrt(lsq)

    def arrays(self, with_optimizer: bool) -> dict[str, np.ndarray]:
        """The model's arrays by name (copies); the AdaGrad state only if asked."""
        out = {"class_weights": self.class_weights.copy(),
               "length_weights": self.length_weights.copy()}
        if with_optimizer:
            out |= {"class_sq": self.class_sq.copy(), "length_sq": self.length_sq.copy()}
        return out

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the weights (and the AdaGrad state, when given) by copies of `arrays`;
        raises ValueError if a shape differs from this model's."""
        for name, value in arrays.items():
            current = getattr(self, name, None)
            if not isinstance(current, np.ndarray) or name not in _ARRAYS:
                raise ValueError(f"unknown model array {name!r}")
            if value.shape != current.shape:
                raise ValueError(f"model array {name} has shape {value.shape}, "
                                 f"expected {current.shape}")
        for name, value in arrays.items():
            setattr(self, name, np.array(value, dtype=np.float32, copy=True))
