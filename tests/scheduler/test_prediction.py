"""The output-length predictor contract and the running-median predictor: the prior
before anything finished, the median of what finished, bounded memory, the max_tokens cap
and the bucket edges."""

from __future__ import annotations

import pytest

from shuffleinfer.predictor import NgramPredictor
from shuffleinfer.scheduler.prediction import Prediction, PredictorInput
from shuffleinfer.scheduler.predictors import (
    PREDICTORS,
    PredictorConfig,
    RunningMedian,
    bucketed,
    make_predictor,
)


def request(max_tokens: int = 1024) -> PredictorInput:
    return PredictorInput(num_prompt_tokens=3, prompt_text="Hi there", max_tokens=max_tokens)


def test_before_anything_finished_the_prior_is_predicted() -> None:
    assert RunningMedian().predict(request(1024)) == Prediction(0, 200, 128, 0)
    prior = RunningMedian(PredictorConfig(prior_output_tokens=450))
    assert prior.predict(request(1024)) == Prediction(400, 600, 450, 2)


def test_the_median_of_finished_requests_is_predicted() -> None:
    predictor = RunningMedian()
    for n in (10, 500, 30, 700, 20):
        predictor.observe(request(1024), n)
    assert predictor.predict(request(1024)).point == 30
    predictor.observe(request(1024), 600)
    assert predictor.predict(request(1024)).point == 265  # (30 + 500) / 2, rounded


def test_only_the_latest_window_is_remembered() -> None:
    predictor = RunningMedian(PredictorConfig(window_size=5))
    for _ in range(100):
        predictor.observe(request(1024), 900)
    for _ in range(5):
        predictor.observe(request(1024), 40)
    assert predictor.predict(request(1024)).point == 40


def test_predictions_never_exceed_max_tokens() -> None:
    predictor = RunningMedian()
    predictor.observe(request(2048), 900)
    assert predictor.predict(request(2048)) == Prediction(800, 1000, 900, 4)
    assert predictor.predict(request(250)) == Prediction(200, 250, 250, 1)
    assert predictor.predict(request(1)) == Prediction(0, 1, 1, 0)


def test_bucket_width_sets_the_bounds() -> None:
    predictor = RunningMedian(PredictorConfig(bucket_width_tokens=64))
    predictor.observe(request(1024), 150)
    assert predictor.predict(request(1024)) == Prediction(128, 192, 150, 2)
    assert bucketed(200, 1024, 200) == Prediction(200, 400, 200, 1)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="num_output_tokens"):
        RunningMedian().observe(request(10), -1)
    with pytest.raises(ValueError, match="num_output_tokens"):
        RunningMedian().observe(request(10), 11)
    for max_tokens in (0, -5):
        with pytest.raises(ValueError, match="max_tokens"):
            request(max_tokens)
    with pytest.raises(ValueError, match="inconsistent"):
        Prediction(lower=300, upper=400, point=250, bucket=1)
    with pytest.raises(ValueError):
        PredictorConfig(bucket_width_tokens=0)


def test_predictors_are_chosen_by_name() -> None:
    assert set(PREDICTORS) == {"running_median", "ngram"}
    assert isinstance(make_predictor("running_median"), RunningMedian)
    ngram = make_predictor("ngram", PredictorConfig(bucket_width_tokens=64))
    assert isinstance(ngram, NgramPredictor) and ngram.config.bucket_width_tokens == 64
    with pytest.raises(ValueError, match="'oracle'.*running_median"):
        make_predictor("oracle")
