"""`shuffleinfer model prepare`: only the path on stdout; unknown names exit with 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shuffleinfer.model import DEFAULT_MODEL
from shuffleinfer.model.cli import main


def test_prepare_prints_only_the_path(prepared_model: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shuffleinfer.model.cli", "model", "prepare"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == f"{prepared_model}\n"


def test_noop_prepare_does_not_import_torch(prepared_model: Path) -> None:
    # A prepared model must cost a serving process nothing: no torch, no transformers.
    code = (
        "import sys; from shuffleinfer.model import resolve_model; "
        f"print(resolve_model({DEFAULT_MODEL!r})); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.splitlines() == [str(prepared_model), "[]"]


def test_unknown_name_exits_2_listing_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["model", "prepare", "no-such-model"])
    assert exc_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no-such-model" in captured.err and DEFAULT_MODEL in captured.err


def test_explicit_cache_dir_and_no_verify_are_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []

    def fake_prepare(name: str, cache_dir: Path | None, *, verify: bool) -> Path:
        calls.append((name, cache_dir, verify))
        return tmp_path / name

    monkeypatch.setattr("shuffleinfer.model.cli.prepare_model", fake_prepare)
    assert (
        main(["model", "prepare", DEFAULT_MODEL, "--cache-dir", str(tmp_path), "--no-verify"]) == 0
    )
    assert calls == [(DEFAULT_MODEL, tmp_path, False)]
    assert capsys.readouterr().out == f"{tmp_path / DEFAULT_MODEL}\n"
