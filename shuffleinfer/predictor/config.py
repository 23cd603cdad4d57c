"""Configuration of the learned output-length predictor."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shuffleinfer.scheduler.predictors import PredictorConfig

PointRule = Literal["regression", "distribution_median"]
BucketRule = Literal["most_likely", "holding_point"]


class NgramPredictorConfig(PredictorConfig):
    """Parameters of the hashed n-gram predictor; the inherited fields (bucket width,
    running-median window and prior) also configure its prior."""

    bucket_width_tokens: int = Field(default=50, ge=1, description=(
        "Width of a length bucket. 50 tokens: at 200 (the paper's width) the lower bound "
        "of almost every request of a small model is 0, which tells the schedulers "
        "nothing; 50 keeps bounds informative while bucket accuracy stays well above the "
        "baselines."))
    hash_bits: int = Field(default=16, ge=8, le=24, description=(
        "The features are hashed into 2**hash_bits slots; the weights take "
        "2**hash_bits * (buckets + 1) floats."))
    max_output_tokens: int = Field(default=2048, ge=1, description=(
        "Longest length with buckets of its own; longer outputs share the last bucket."))
    learning_rate: float = Field(default=0.2, gt=0, description="AdaGrad step size.")
    l2: float = Field(default=1e-5, ge=0, description="L2 penalty on touched weights.")
    fit_epochs: int = Field(default=4, ge=1, description=(
        "Passes over the labelled data when fitting offline."))
    min_observations: int = Field(default=100, ge=0, description=(
        "Until fitted or told this many lengths, the running-median prior is predicted."))
    point_rule: PointRule = Field(default="regression", description=(
        "Point estimate: the log-length median regression, or the median of the bucket "
        "distribution; either is clipped into the predicted bucket."))
    bucket_rule: BucketRule = Field(default="most_likely", description=(
        "The predicted bucket: the most likely one (the point is clipped into it), or the "
        "one holding the point estimate (better MAE when lengths are bimodal, e.g. a "
        "model that either answers briefly or runs to max_tokens)."))
    seed: int = Field(default=0, description="Seed of the shuffling when fitting.")

    @property
    def num_buckets(self) -> int:
        """Buckets of the classifier: those below max_output_tokens plus an open last one."""
        return -(-self.max_output_tokens // self.bucket_width_tokens) + 1
