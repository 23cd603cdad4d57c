"""Evaluation of output-length predictors on labelled prompts.

Two measurements, each for the learned predictor and every baseline in the same run:
- held out: split by prompt_id (a seeded hash, so a prompt is never on both sides), fit
  on the train side, predict the test side;
- prequential: the whole labelled stream in file order, every predictor starting from
  its prior, predicting each request before observing it; figures cover the requests
  after the first `warmup` (each was predicted before it was learnt from).

Figures: bucket accuracy at each width (the learned predictor is fitted once per width,
configured with that width), +/-1-bucket accuracy, and the mean absolute error of the
point estimate (at the primary width, the first).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shuffleinfer.predictor.baselines import (
    ConstantMedian,
    EvalPredictor,
    Example,
    LearnedPredictor,
    LinearInPromptLength,
    PerTaskMedian,
)
from shuffleinfer.predictor.config import NgramPredictorConfig
from shuffleinfer.predictor.data import PromptRecord, stable_hash
from shuffleinfer.predictor.labels import LabelRow, Target
from shuffleinfer.scheduler.prediction import Prediction, PredictorInput

Factory = Callable[[int], EvalPredictor]
"""Builds a fresh predictor for a bucket width."""


@dataclass(frozen=True)
class Scores:
    """Figures of one predictor on one set of examples."""

    num_examples: int
    accuracy: dict[int, float]
    """Bucket accuracy by bucket width."""
    within_one: dict[int, float]
    """Accuracy within one bucket, by bucket width."""
    mae: float
    """Mean absolute error of the point estimate, in tokens (primary width)."""


@dataclass
class EvalReport:
    """All figures of one evaluation run."""

    target: Target
    max_tokens: int
    widths: tuple[int, ...]
    num_train: int
    num_test: int
    num_stream: int
    warmup: int
    held_out: dict[str, Scores] = field(default_factory=dict)
    prequential: dict[str, Scores] = field(default_factory=dict)


def score(predictions: Mapping[int, Sequence[Prediction]], truths: Sequence[int]) -> Scores:
    """Scores of predictions (by bucket width, the first width's points count for MAE)."""
    truth = np.asarray(truths)
    accuracy, within_one = {}, {}
    for width, preds in predictions.items():
        predicted = np.array([p.bucket for p in preds])
        actual = truth // width
        accuracy[width] = float(np.mean(predicted == actual)) if len(truth) else 0.0
        within_one[width] = float(np.mean(np.abs(predicted - actual) <= 1)) if len(truth) else 0.0
    primary = next(iter(predictions.values()))
    points = np.array([p.point for p in primary])
    mae = float(np.mean(np.abs(points - truth))) if len(truth) else 0.0
    return Scores(num_examples=len(truth), accuracy=accuracy, within_one=within_one, mae=mae)


def build_examples(labels: Sequence[LabelRow], prompts: dict[str, PromptRecord],
                   target: Target, max_tokens: int | None = None) -> tuple[list[Example], int]:
    """Labelled requests for `target` (skipped prompts left out) and the max_tokens of the
    labelling run: given, else the longest length whose finish reason is "length" (else
    the longest length). The requests are chat requests with the target's temperature.

    Raises ValueError naming the id of a label whose prompt is not in `prompts`.
    """
    rows = [r for r in labels if r.output_tokens(target) is not None]
    if not rows:
        raise ValueError(f"no {target} labels to evaluate")
    if max_tokens is None:
        cut = [r.output_tokens(target) or 0 for r in rows if r.finish_reason(target) == "length"]
        max_tokens = max(cut or [r.output_tokens(target) or 0 for r in rows])
    max_tokens = max(max_tokens, 1)
    temperature = 0.0 if target == "greedy" else 0.7
    examples = []
    for row in rows:
        record = prompts.get(row.id)
        if record is None:
            raise ValueError(f"label {row.id} has no prompt in the data file")
        length = row.output_tokens(target)
        if length is None or length > max_tokens:
            raise ValueError(f"label {row.id}: {target} length {length} > max_tokens {max_tokens}")
        request = PredictorInput(num_prompt_tokens=max(row.prompt_tokens, 1),
                                 prompt_text=record.last_user_text, max_tokens=max_tokens,
                                 is_chat=True, temperature=temperature)
        examples.append(Example(request, row.task, row.prompt_id, length))
    return examples, max_tokens


def split_by_prompt(examples: Sequence[Example], test_percent: int,
                    seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test): a prompt is in test iff a seeded hash of its prompt_id says so."""
    if not 0 < test_percent < 100:
        raise ValueError(f"test_percent must be in (0, 100), got {test_percent}")
    train: list[Example] = []
    test: list[Example] = []
    for e in examples:
        (test if stable_hash(e.prompt_id, seed) % 100 < test_percent else train).append(e)
    return train, test


def predictor_factories(config: NgramPredictorConfig) -> dict[str, Factory]:
    """The learned predictor (with `config` at each width) and the baselines, by name."""
    prior = config.prior_output_tokens

    def learned(width: int) -> EvalPredictor:
        return LearnedPredictor(config.model_copy(update={"bucket_width_tokens": width}))

    factories: dict[str, Factory] = {LearnedPredictor.name: learned}
    for cls in (ConstantMedian, LinearInPromptLength, PerTaskMedian):
        factories[cls.name] = (lambda c: lambda width: c(width, prior))(cls)
    return factories


def held_out(factory: Factory, train: Sequence[Example], test: Sequence[Example],
             widths: Sequence[int]) -> Scores:
    """Fit a fresh predictor per width on `train`, predict `test`, score."""
    predictions = {}
    for width in widths:
        predictor = factory(width)
        predictor.fit(train)
        predictions[width] = [predictor.predict(e) for e in test]
    return score(predictions, [e.num_output_tokens for e in test])


def prequential(factory: Factory, stream: Sequence[Example], widths: Sequence[int],
                warmup: int) -> Scores:
    """Predict-then-observe over `stream` from the prior; score the part after `warmup`."""
    predictions = {}
    for width in widths:
        predictor = factory(width)
        preds = []
        for e in stream:
            preds.append(predictor.predict(e))
            predictor.observe(e)
        predictions[width] = preds[warmup:]
    return score(predictions, [e.num_output_tokens for e in stream[warmup:]])


def evaluate(examples: Sequence[Example], target: Target, max_tokens: int,
             config: NgramPredictorConfig, widths: Sequence[int] = (50, 100, 200),
             test_percent: int = 25, warmup: int = 500, seed: int = 0) -> EvalReport:
    """Both measurements for the learned predictor and the baselines."""
    if not widths or min(widths) < 1:
        raise ValueError(f"bucket widths must be >= 1, got {list(widths)}")
    train, test = split_by_prompt(examples, test_percent, seed)
    if not train or not test:
        raise ValueError(f"split of {len(examples)} examples left {len(train)} to train "
                         f"and {len(test)} to test; label more prompts")
    report = EvalReport(target=target, max_tokens=max_tokens, widths=tuple(widths),
                        num_train=len(train), num_test=len(test), num_stream=len(examples),
                        warmup=min(warmup, len(examples)))
    for name, factory in predictor_factories(config).items():
        report.held_out[name] = held_out(factory, train, test, widths)
        report.prequential[name] = prequential(factory, examples, widths[:1], report.warmup)
    return report
