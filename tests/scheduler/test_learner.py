"""The cluster's one length learner at the global scheduler: it stands in with its prior
when a prediction does not come, scores predictions against true lengths, learns from
finished requests only, and hands newer models to prediction sites."""

from __future__ import annotations

from pathlib import Path

from shuffleinfer.predictor import NgramPredictor, NgramPredictorConfig
from shuffleinfer.scheduler.global_scheduler import GlobalScheduler
from shuffleinfer.scheduler.learner import Learner
from shuffleinfer.scheduler.prediction import Prediction, PredictorInput
from shuffleinfer.scheduler.predictors import RunningMedian


def _input(text: str = "Write a long story about a dragon.",
           max_tokens: int = 512) -> PredictorInput:
    return PredictorInput(num_prompt_tokens=12, prompt_text=text, max_tokens=max_tokens,
                          is_chat=True)


def _run(sched: GlobalScheduler, req_id: str, prediction: Prediction | None,
         num_output_tokens: int | None) -> None:
    sched.schedule_prefill(req_id, 12, _input())
    sched.prefill_done(req_id)
    sched.schedule_decode(req_id, prediction)
    sched.finish(req_id, num_output_tokens)


def test_missing_prediction_is_replaced_by_the_prior_and_counted() -> None:
    learner = Learner(RunningMedian())
    sched = GlobalScheduler(["p0"], ["d0"], learner=learner)
    for i, n in enumerate([100, 120, 140]):
        _run(sched, f"r{i}", Prediction(0, 200, 100, 0), n)
    sched.schedule_prefill("late", 12, _input())
    sched.prefill_done("late")
    sched.schedule_decode("late", None)
    stats = sched.learner_stats()
    assert stats.num_fallbacks == 1
    # The prior's guess (the running median of 100, 120, 140) placed the decode.
    assert sched._table["late"].prediction is not None
    assert sched._table["late"].prediction.point == 120


def test_finished_requests_are_scored_and_taught_aborted_ones_are_not() -> None:
    predictor = RunningMedian()
    sched = GlobalScheduler(["p0"], ["d0"], learner=Learner(predictor))
    _run(sched, "hit", Prediction(100, 150, 120, 2), 130)
    _run(sched, "miss", Prediction(0, 50, 20, 0), 300)
    _run(sched, "aborted", Prediction(0, 50, 20, 0), None)
    stats = sched.learner_stats()
    assert (stats.num_scored, stats.num_bucket_hits) == (2, 1)
    assert sorted(stats.abs_errors) == [10, 280]
    assert predictor.window == [130, 300]  # the aborted request taught nothing
    assert sched.learner_stats().abs_errors == ()  # errors are drained once read


def test_sites_get_a_snapshot_only_when_the_learner_is_newer(tmp_path: Path) -> None:
    config = NgramPredictorConfig(min_observations=0, hash_bits=10)
    learner = Learner(NgramPredictor(config), state_path=tmp_path / "state.npz")
    sched = GlobalScheduler(["p0"], ["d0"], learner=learner)
    assert sched.predictor_snapshot(0) is None  # nothing learned yet
    for i in range(20):
        _run(sched, f"r{i}", None, 400)
    state = sched.predictor_snapshot(0)
    assert state is not None and state.version == 20
    assert sched.predictor_snapshot(state.version) is None

    site = NgramPredictor(config)
    assert site.apply(state)
    assert site.predict(_input()) == learner.predictor.predict(_input())

    sched.save_predictor()
    restored = Learner.create("ngram", tmp_path / "state.npz")
    assert restored.version == 20


def test_learner_started_in_place_learns_from_read_only_shipped_state(tmp_path: Path) -> None:
    # What Ray's object store hands over is read-only; the learner must be built where it
    # learns, from a file or a fresh start.
    config = NgramPredictorConfig(min_observations=0, hash_bits=10)
    source = NgramPredictor(config)
    source.observe(_input(), 300)
    source.save(tmp_path / "state.npz")
    sched = GlobalScheduler(["p0"], ["d0"])
    sched.start_learner("ngram", tmp_path / "state.npz")
    _run(sched, "r0", None, 200)
    assert sched.learner is not None and sched.learner.version == 2
