"""`shuffleinfer simulate` end to end on a real trace file: the harness's outputs, and bad
flags named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shuffleinfer.cli import main
from shuffleinfer.sim.cli import parse_clusters

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_simulate_writes_the_harness_outputs(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["simulate", "--trace", "azure2023-conv", "--max-requests", "300",
                 "--cluster", "2p2d,vllm:4", "--out", str(out), "--data-dir", str(DATA),
                 "--max-model-len", "4096"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"shuffleinfer-2p2d", "vllm-4"}
    for s in summary.values():
        assert s["completed"] == 300 and s["failed"] == 0
        assert s["mean_ttft_ms"] > 0 and s["mean_jct_ms"] > s["mean_ttft_ms"]
        assert s["instance_seconds"] == pytest.approx(4 * s["duration"])
    records = (out / "vllm-4.records.jsonl").read_text().splitlines()
    assert len(records) == 300
    assert {p.name for p in out.glob("*.png")} == {"ttft_cdf.png", "jct_cdf.png",
                                                    "throughput.png", "queue.png"}
    config = json.loads((out / "config.json").read_text())
    assert config["cost_model"]["name"] == "a100-opt13b"
    assert "mean_ttft_ms" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "flag"), [
    (["--cluster", "0p2d"], "--cluster"),
    (["--cluster", "2p2d", "--decode-policy", "best"], "--decode-policy"),
    (["--cluster", "2p2d", "--cost-model", "tpu"], "--cost-model"),
    (["--cluster", "2p2d", "--oracle-accuracy", "1.5"], "--oracle-accuracy"),
    (["--cluster", "vllm:2", "--chunk-size", "0"], "--chunk-size"),
])
def test_bad_flags_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             argv: list[str], flag: str) -> None:
    code = main(["simulate", "--trace", "lpld", "--out", str(tmp_path), *argv])
    assert code == 2
    assert flag in capsys.readouterr().err


def test_cluster_specs() -> None:
    systems = parse_clusters("3p5d, vllm:8")
    assert [(n, c.num_prefill, c.num_decode, c.colocated) for n, c in systems] == [
        ("shuffleinfer-3p5d", 3, 5, 0), ("vllm-8", 1, 1, 8)]


def test_one_or_two_workers_write_the_same_records(tmp_path: Path) -> None:
    for workers in ("1", "2"):
        assert main(["simulate", "--trace", "azure2023-conv", "--max-requests", "400",
                     "--cluster", "2p3d", "--decode-policy", "shuffle", "--oracle-accuracy",
                     "0.75", "--out", str(tmp_path / workers), "--data-dir", str(DATA),
                     "--max-model-len", "4096", "--workers", workers]) == 0
    one, two = ((tmp_path / w / "shuffleinfer-2p3d.records.jsonl").read_text()
                for w in ("1", "2"))
    assert one == two and len(one.splitlines()) == 400
