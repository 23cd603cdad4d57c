"""Predictions made beside the prefill: ready in time they go with the request; late or
failing ones never delay it and are counted."""

from __future__ import annotations

import asyncio
import time

from shuffleinfer.predictor.site import PredictionSite, predictor_input
from shuffleinfer.protocol import GenerateRequest, SamplingOptions
from shuffleinfer.scheduler.prediction import OutputLengthPredictor, Prediction, PredictorInput

PREDICTION = Prediction(lower=100, upper=150, point=120, bucket=2)


class _Scripted(OutputLengthPredictor):
    def __init__(self, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.delay_s, self.error = delay_s, error
        self.seen: list[PredictorInput] = []

    def predict(self, request: PredictorInput) -> Prediction:
        self.seen.append(request)
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return PREDICTION

    def observe(self, request: PredictorInput, num_output_tokens: int) -> None:
        raise AssertionError("a prediction site never learns")


def _request() -> GenerateRequest:
    return GenerateRequest("r1", (1, 2, 3, 4), SamplingOptions(max_tokens=300, temperature=0.0,
                                                               stop=("\n\n",)),
                           prompt_text="Summarise this meeting.", is_chat=True)


async def _prefill(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "first token"


async def test_a_prediction_ready_in_time_goes_with_the_prefill() -> None:
    predictor = _Scripted()
    site = PredictionSite(predictor)
    result, prediction = await site.beside(_request(), _prefill(0.2))
    assert (result, prediction) == ("first token", PREDICTION)
    assert predictor.seen == [PredictorInput(num_prompt_tokens=4,
                                             prompt_text="Summarise this meeting.",
                                             max_tokens=300, is_chat=True, temperature=0.0,
                                             has_stop=True)]
    assert site.stats.num_on_time == 1 and len(site.stats.predict_seconds) == 1


async def test_a_slow_prediction_does_not_delay_the_prefill() -> None:
    site = PredictionSite(_Scripted(delay_s=0.5))
    started = time.perf_counter()
    result, prediction = await site.beside(_request(), _prefill(0.01))
    assert time.perf_counter() - started < 0.2
    assert result == "first token" and prediction is None
    assert (site.stats.num_late, site.stats.num_on_time) == (1, 0)
    await asyncio.sleep(0.6)  # let the worker thread finish before the loop closes


async def test_a_failing_predictor_costs_only_a_counted_fallback() -> None:
    site = PredictionSite(_Scripted(error=RuntimeError("model file corrupt")))
    result, prediction = await site.beside(_request(), _prefill(0.2))
    assert result == "first token" and prediction is None
    assert site.stats.num_failed == 1


async def test_no_predictor_means_no_prediction_and_no_thread() -> None:
    site = PredictionSite(None)
    assert await site.beside(_request(), _prefill(0.0)) == ("first token", None)
    assert site.stats.num_on_time == site.stats.num_late == 0


def test_input_for_a_token_id_prompt_has_empty_text() -> None:
    request = GenerateRequest("r2", (5, 6), SamplingOptions(max_tokens=8))
    assert predictor_input(request).prompt_text == ""
    assert predictor_input(request).is_chat is False
