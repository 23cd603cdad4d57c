"""The output-length predictor contract and the running-median predictor: the prior
before anything finished, the median of what finished, bounded memory, the max_tokens cap
and the bucket edges."""

from __future__ import annotations

import pytest

from shuffleinfer.scheduler.prediction import Prediction
from shuffleinfer.scheduler.predictors import (
    PREDICTORS,
    PredictorConfig,
    RunningMedian,
    bucketed,
    make_predictor,
)

PROMPT = [1, 2, 3]


def test_before_anything_finished_the_prior_is_predicted() -> None:
    assert RunningMedian().predict(PROMPT, 1024) == Prediction(0, 200, 128, 0)
    prior = RunningMedian(PredictorConfig(prior_output_tokens=450))
    assert prior.predict(PROMPT, 1024) == Prediction(400, 600, 450, 2)


def test_the_median_of_finished_requests_is_predicted() -> None:
    predictor = RunningMedian()
    for n in (10, 500, 30, 700, 20):
        predictor.observe(PROMPT, 1024, n)
    assert predictor.predict(PROMPT, 1024).point == 30
    predictor.observe(PROMPT, 1024, 600)
    assert predictor.predict(PROMPT, 1024).point == 265  # (30 + 500) / 2, rounded


def test_only_the_latest_window_is_remembered() -> None:
    predictor = RunningMedian(PredictorConfig(window_size=5))
    for _ in range(100):
        predictor.observe(PROMPT, 1024, 900)
    for _ in range(5):
        predictor.observe(PROMPT, 1024, 40)
    assert predictor.predict(PROMPT, 1024).point == 40


def test_predictions_never_exceed_max_tokens() -> None:
    predictor = RunningMedian()
    predictor.observe(PROMPT, 2048, 900)
    assert predictor.predict(PROMPT, 2048) == Prediction(800, 1000, 900, 4)
    assert predictor.predict(PROMPT, 250) == Prediction(200, 250, 250, 1)
    assert predictor.predict(PROMPT, 0) == Prediction(0, 0, 0, 0)


def test_bucket_width_sets_the_bounds() -> None:
    predictor = RunningMedian(PredictorConfig(bucket_width_tokens=64))
    predictor.observe(PROMPT, 1024, 150)
    assert predictor.predict(PROMPT, 1024) == Prediction(128, 192, 150, 2)
    assert bucketed(200, 1024, 200) == Prediction(200, 400, 200, 1)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="true_output_tokens"):
        RunningMedian().observe(PROMPT, 10, -1)
    with pytest.raises(ValueError, match="max_tokens"):
        RunningMedian().predict(PROMPT, -5)
    with pytest.raises(ValueError, match="inconsistent"):
        Prediction(lower=300, upper=400, point=250, bucket=1)
    with pytest.raises(ValueError):
        PredictorConfig(bucket_width_tokens=0)


def test_predictors_are_chosen_by_name() -> None:
    assert set(PREDICTORS) == {"running_median"}
    assert isinstance(make_predictor("running_median"), RunningMedian)
    with pytest.raises(ValueError, match="'oracle'.*running_median"):
        make_predictor("oracle")
