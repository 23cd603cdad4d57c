"""The learned predictor as its users see it: it learns online, never predicts past
max_tokens, treats a request cut at max_tokens as "at least", starts from a fitted model
or its prior, and refuses malformed input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shuffleinfer.predictor import NgramPredictor, NgramPredictorConfig
from shuffleinfer.scheduler.prediction import PredictorInput
from shuffleinfer.scheduler.predictors import RunningMedian
from tests.predictor.conftest import learnable_stream, request


def _mae(predictor: NgramPredictor | RunningMedian,
         stream: list[tuple[PredictorInput, int]]) -> float:
    return float(np.mean([abs(predictor.predict(r).point - n) for r, n in stream]))


def test_online_updates_reduce_the_error_on_a_learnable_stream() -> None:
    predictor = NgramPredictor(NgramPredictorConfig(min_observations=0))
    median = RunningMedian()
    errors, median_errors = [], []
    for req, n in learnable_stream(600):
        errors.append(abs(predictor.predict(req).point - n))
        median_errors.append(abs(median.predict(req).point - n))
        predictor.observe(req, n)
        median.observe(req, n)
    first, last = np.mean(errors[:100]), np.mean(errors[-200:])
    assert last < 0.3 * first
    assert last < 0.3 * np.mean(median_errors[-200:])  # the median cannot learn it


def test_it_learns_the_buckets_and_predicts_in_them() -> None:
    predictor = NgramPredictor()
    stream = learnable_stream(800)
    predictor.fit([r for r, _ in stream], [n for _, n in stream])
    story = predictor.predict(request("write a long story about winter and trains"))
    word = predictor.predict(request("answer in one word: bread and taxes"))
    assert story.lower <= 420 <= story.upper and story.upper - story.lower <= 50
    assert word.bucket == 0 and word.point <= 15
    assert word.lower <= word.point <= word.upper


def test_before_it_has_learnt_it_predicts_the_prior() -> None:
    predictor = NgramPredictor(NgramPredictorConfig(min_observations=3,
                                                    prior_output_tokens=77))
    assert predictor.predict(request()).point == 77
    for n in (10, 20, 30):
        predictor.observe(request(), n)
    assert predictor.ready


@pytest.mark.parametrize("max_tokens", [1, 7, 60, 419])
def test_predictions_never_exceed_max_tokens(max_tokens: int) -> None:
    predictor = NgramPredictor()
    stream = learnable_stream(300)
    predictor.fit([r for r, _ in stream], [n for _, n in stream])
    prediction = predictor.predict(request("write a long story about the sea", max_tokens))
    assert prediction.point <= prediction.upper <= max_tokens
    if max_tokens == 419:  # the story bucket [400, 450) is cut at 419
        assert (prediction.lower, prediction.upper) == (400, 419)


def test_a_request_cut_at_max_tokens_teaches_at_least_that_many() -> None:
    # every story hit max_tokens=100; asked with room to spare, predict more than 100
    cut = [(request(f"write a long story about topic {i}", max_tokens=100), 100)
           for i in range(200)]
    predictor = NgramPredictor()
    predictor.fit([r for r, _ in cut], [n for _, n in cut])
    roomy = predictor.predict(request("write a long story about topic 7", max_tokens=1000))
    assert roomy.lower >= 100 and roomy.point >= 100


def test_fit_continues_from_a_prior_and_makes_it_ready() -> None:
    predictor = NgramPredictor(NgramPredictorConfig(min_observations=10_000))
    assert not predictor.ready
    stream = learnable_stream(200)
    predictor.fit([r for r, _ in stream], [n for _, n in stream])
    assert predictor.ready
    assert _mae(predictor, learnable_stream(100, seed=1)) < 30


@pytest.mark.parametrize("kwargs, match", [
    ({"num_prompt_tokens": 0}, "empty prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"num_prompt_tokens": math.nan}, "num_prompt_tokens"),
])
def test_malformed_requests_are_refused(kwargs: dict, match: str) -> None:
    fields = {"num_prompt_tokens": 5, "prompt_text": "hi", "max_tokens": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        PredictorInput(**fields)


@pytest.mark.parametrize("length", [-1, 17, math.nan, 3.0])
def test_malformed_lengths_are_refused(length: float) -> None:
    predictor = NgramPredictor()
    with pytest.raises(ValueError, match="num_output_tokens"):
        predictor.observe(request(max_tokens=16), length)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_output_tokens"):
        predictor.fit([request(max_tokens=16)], [length])  # type: ignore[list-item]
    assert predictor.version == 0 and not predictor.ready  # nothing was learnt


def test_fit_refuses_mismatched_or_empty_data() -> None:
    with pytest.raises(ValueError, match="2 inputs but 1 lengths"):
        NgramPredictor().fit([request(), request()], [3])
    with pytest.raises(ValueError, match="at least one"):
        NgramPredictor().fit([], [])


def test_without_text_the_prompt_length_still_informs_the_prediction() -> None:
    # a completion given as token ids has no text; its length is still a feature
    short, long = request(text="", num_prompt_tokens=12), request(text="", num_prompt_tokens=900)
    predictor = NgramPredictor()
    predictor.fit([short, long] * 100, [20, 300] * 100)
    assert predictor.predict(short).bucket == 0
    assert predictor.predict(long).bucket == 6
