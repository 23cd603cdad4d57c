"""`shuffleinfer calibrate` and how `serve` picks its result up: the saturation rule on
synthetic curves, the file round trip, the chunk-size resolver, flag errors, and (marked
`engine`) one real run on the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from shuffleinfer.cli import main
from shuffleinfer.config import ServeConfig
from shuffleinfer.engine.calibration import (
    DEFAULT_CHUNK_SIZE,
    Calibration,
    calibration_path,
    make_calibration,
    read_calibration,
    resolved_chunk_size,
    saturation_point,
    write_calibration,
    write_plot,
)

SIZES = [32, 64, 128, 256, 512]


@pytest.mark.parametrize(("rates", "threshold", "chunk_size"), [
    ([100, 200, 400, 800, 800], 0.9, 256),      # flat from 256 on
    ([100, 200, 400, 720, 800], 0.9, 256),      # exactly 90% of best counts
    ([100, 200, 400, 719, 800], 0.9, 512),      # just under 90% does not
    ([100, 200, 400, 800, 800], 1.0, 256),      # threshold 1: the first size at the best
    ([100, 900, 400, 800, 800], 0.9, 64),       # a noisy peak early: the smallest that reaches
    ([100, 200, 400, 800, 800], 0.01, 32),      # everything qualifies: the smallest size
    ([500, 500, 500, 500, 500], 0.9, 32),       # already saturated at the smallest size
])
def test_saturation_point_is_the_smallest_size_near_the_best(
        rates: list[float], threshold: float, chunk_size: int) -> None:
    assert saturation_point(SIZES, rates, threshold) == chunk_size


@pytest.mark.parametrize(("sizes", "rates", "threshold", "message"), [
    ([], [], 0.9, "one throughput per size"),
    ([32, 64], [1.0], 0.9, "one throughput per size"),
    ([32], [1.0], 0.0, "threshold"),
    ([32], [1.0], 1.5, "threshold"),
    ([32, 64], [0.0, 1.0], 0.9, "> 0"),
])
def test_saturation_point_refuses_bad_input(sizes: list[int], rates: list[float],
                                            threshold: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        saturation_point(sizes, rates, threshold)


def calibration(model: str = "SmolLM2-135M-Instruct", cpus: int = 1) -> Calibration:
    """Step times of a curve that saturates at 256 tokens."""
    seconds = [32 / 100, 64 / 200, 128 / 400, 256 / 800, 512 / 820]
    return make_calibration(model, "float32", cpus, SIZES, seconds, 0.9, repeats=3)


def test_make_calibration_orders_sizes_and_picks_the_saturation_point() -> None:
    shuffled = make_calibration("m", "float32", 1, [512, 32, 256, 64, 128],
                                [512 / 820, 32 / 100, 256 / 800, 64 / 200, 128 / 400], 0.9, 1)
    assert shuffled.sizes == SIZES
    assert shuffled.tokens_per_s == pytest.approx([100, 200, 400, 800, 820])
    assert shuffled.chunk_size == 256


def test_calibration_file_round_trips_with_its_plot(tmp_path: Path) -> None:
    saved = calibration()
    path = tmp_path / "sub" / "cal.json"
    write_calibration(path, saved)
    assert read_calibration(path) == saved
    assert set(json.loads(path.read_text())) >= {
        "model", "dtype", "cpus", "sizes", "seconds", "tokens_per_s", "threshold",
        "chunk_size", "date"}
    write_plot(saved, path.with_suffix(".png"))
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("text", ["not json", '{"model": "m"}', "[]"])
def test_a_file_that_is_not_a_calibration_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cal.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="not a calibration file"):
        read_calibration(path)


def test_calibration_path_is_beside_the_models_and_flattens_hf_ids(tmp_path: Path) -> None:
    assert calibration_path("SmolLM2-135M-Instruct", tmp_path) == \
        tmp_path / "calibration" / "SmolLM2-135M-Instruct.json"
    assert calibration_path("Qwen/Qwen2.5-0.5B", tmp_path).name == "Qwen--Qwen2.5-0.5B.json"


def config(tmp_path: Path, **fields: object) -> ServeConfig:
    return ServeConfig.model_validate({"cache_dir": tmp_path, **fields})


def test_an_explicit_chunk_size_wins_over_the_calibration(tmp_path: Path) -> None:
    write_calibration(calibration_path("SmolLM2-135M-Instruct", tmp_path), calibration())
    assert resolved_chunk_size(config(tmp_path, chunk_size=1024)) == (1024, "--chunk-size")


def test_the_models_calibration_is_used(tmp_path: Path) -> None:
    path = calibration_path("SmolLM2-135M-Instruct", tmp_path)
    write_calibration(path, calibration())
    chunk_size, source = resolved_chunk_size(config(tmp_path))
    assert chunk_size == 256
    assert "calibrated on this machine" in source and str(path) in source


def test_another_models_calibration_is_ignored(tmp_path: Path) -> None:
    write_calibration(calibration_path("Qwen/Qwen2.5-0.5B", tmp_path),
                      calibration(model="Qwen/Qwen2.5-0.5B"))
    chunk_size, source = resolved_chunk_size(config(tmp_path))
    assert chunk_size == DEFAULT_CHUNK_SIZE == 512
    assert "no calibration" in source
    assert resolved_chunk_size(config(tmp_path, model="Qwen/Qwen2.5-0.5B"))[0] == 256


def test_no_calibration_means_512(tmp_path: Path) -> None:
    assert config(tmp_path).chunk_size is None  # unset: resolved when serve starts
    assert resolved_chunk_size(config(tmp_path))[0] == 512


def test_a_broken_calibration_falls_back_to_512_saying_why(tmp_path: Path) -> None:
    path = calibration_path("SmolLM2-135M-Instruct", tmp_path)
    write_calibration(path, replace(calibration(), chunk_size=4))
    chunk_size, source = resolved_chunk_size(config(tmp_path))
    assert chunk_size == 512 and "ignored" in source and "chunk_size" in source


def test_a_calibration_on_other_cores_is_used_but_flagged(tmp_path: Path) -> None:
    write_calibration(calibration_path("SmolLM2-135M-Instruct", tmp_path), calibration(cpus=1))
    chunk_size, source = resolved_chunk_size(config(tmp_path, cpus_per_instance=2))
    assert chunk_size == 256 and "--cpus-per-instance 2" in source


@pytest.mark.parametrize(("args", "named"), [
    (["--sizes", "32,abc"], "--sizes"),
    (["--sizes", "0,64"], "--sizes"),
    (["--sizes", "-32"], "--sizes"),
    (["--sizes", "8,64"], "--sizes"),            # below serve's smallest --chunk-size
    (["--sizes", "64,64"], "--sizes"),
    (["--sizes", ""], "--sizes"),
    (["--threshold", "0"], "--threshold"),
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "nan"], "--threshold"),
    (["--threshold", "most"], "--threshold"),
    (["--repeats", "0"], "--repeats"),
    (["--cpus-per-instance", "0"], "--cpus-per-instance"),
    (["--dtype", "float8"], "--dtype"),
])
def test_bad_flags_exit_2_naming_the_flag(args: list[str], named: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["calibrate", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "shuffleinfer calibrate: error:" in err and named in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("engine_arg", "message"), [
    ("seed=1", "calibrate sets seed itself"),
    ("enable_prefix_caching=true", "calibrate sets enable_prefix_caching itself"),
    ("max_num_batched_tokens=64", "with its own option"),
])
def test_engine_args_calibrate_or_serve_own_are_refused(
        engine_arg: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--engine-arg", engine_arg]) == 2
    err = capsys.readouterr().err
    assert "shuffleinfer calibrate: error: invalid --engine-arg" in err and message in err


@pytest.mark.engine
def test_calibrate_on_the_real_engine(tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    # enforce_eager skips torch.compile (over a minute on 2 cores); the curve's numbers
    # are not what this test checks.
    command = [sys.executable, "-m", "shuffleinfer", "calibrate", "--sizes", "16,64",
               "--repeats", "1", "--engine-arg", "enforce_eager=true", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    saved = read_calibration(out)
    assert saved.sizes == [16, 64] and saved.dtype == "float32" and saved.cpus == 1
    assert all(rate > 0 for rate in saved.tokens_per_s)
    assert saved.chunk_size in saved.sizes
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert f"chunk size {saved.chunk_size}" in done.stdout
