"""State across restarts and across the cluster: save/load gives the same predictions and
the same learning afterwards; a prediction site that applies the learner's snapshot
predicts as the learner does, and ignores stale or foreign snapshots."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from shuffleinfer.predictor import NgramPredictor, NgramPredictorConfig
from tests.predictor.conftest import learnable_stream, request

SMALL = NgramPredictorConfig(hash_bits=12, min_observations=0)


def _trained(n: int = 300) -> NgramPredictor:
    predictor = NgramPredictor(SMALL)
    stream = learnable_stream(n)
    predictor.fit([r for r, _ in stream[: n // 2]], [x for _, x in stream[: n // 2]])
    for r, x in stream[n // 2:]:
        predictor.observe(r, x)
    return predictor


def test_save_then_load_predicts_and_keeps_learning_identically(tmp_path: Path) -> None:
    original = _trained()
    path = tmp_path / "state" / "predictor.npz"
    original.save(path)
    restored = NgramPredictor.load(path)
    probes = [r for r, _ in learnable_stream(50, seed=7)] + [request(max_tokens=33)]
    assert [restored.predict(r) for r in probes] == [original.predict(r) for r in probes]
    assert (restored.version, restored.num_observed) == (original.version, original.num_observed)
    for r, x in learnable_stream(40, seed=8):  # learning resumes exactly (optimiser saved)
        original.observe(r, x)
        restored.observe(r, x)
    assert [restored.predict(r) for r in probes] == [original.predict(r) for r in probes]


def test_saving_again_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "predictor.npz"
    first = _trained(100)
    first.save(path)
    second = _trained(300)
    second.save(path)
    assert NgramPredictor.load(path).version == second.version
    assert [p.name for p in tmp_path.iterdir()] == ["predictor.npz"]  # no temp files left


def test_loading_a_bad_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        NgramPredictor.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        NgramPredictor.load(tmp_path / "missing.npz")


def test_a_site_applying_the_learners_snapshot_predicts_like_it() -> None:
    learner, site = _trained(), NgramPredictor(SMALL)
    state = learner.snapshot()
    assert "class_sq" not in state.arrays  # pushes carry weights, not optimiser state
    assert site.apply(state)
    probes = [r for r, _ in learnable_stream(30, seed=3)]
    assert [site.predict(r) for r in probes] == [learner.predict(r) for r in probes]
    # the learner moves on; the site keeps its version until the next push
    for r, x in learnable_stream(50, seed=4):
        learner.observe(r, x)
    assert site.version == state.version < learner.version


def test_a_stale_snapshot_is_ignored() -> None:
    learner, site = _trained(), NgramPredictor(SMALL)
    old = learner.snapshot()
    learner.observe(request(), 5)
    assert site.apply(learner.snapshot())
    assert not site.apply(old)
    assert site.version == learner.version


def test_a_snapshot_of_another_configuration_is_refused() -> None:
    other = NgramPredictor(NgramPredictorConfig(hash_bits=12, bucket_width_tokens=100))
    with pytest.raises(ValueError, match="bucket_width_tokens"):
        NgramPredictor(SMALL).apply(other.snapshot())


def test_a_predictor_shipped_with_read_only_arrays_still_learns() -> None:
    # Ray's object store hands numpy arrays over zero-copy and read-only (pickle
    # protocol 5 out-of-band buffers); the shipped learner must still be able to learn.
    original = _trained(100)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(original, protocol=5, buffer_callback=buffers.append)
    shipped = pickle.loads(data, buffers=[b.raw().toreadonly() for b in buffers])
    before = shipped.version
    for r, x in learnable_stream(20, seed=9):
        shipped.observe(r, x)
        original.observe(r, x)
    assert shipped.version == before + 20
    probes = [r for r, _ in learnable_stream(20, seed=10)]
    assert [shipped.predict(r) for r in probes] == [original.predict(r) for r in probes]
