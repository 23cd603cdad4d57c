"""`python -m benchmarks replay|compare` as a user runs them: against a real (fake) HTTP
server, writing summary.json, records and plots; bad flags and bad traces are refused
with a message naming them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai import FakeServer, serving

from benchmarks.__main__ import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with serving(FakeServer(ttft_s=0.02, itl_s=0.001)) as url:
        yield url


def test_replay_writes_summary_records_and_plots(endpoint: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["replay", "--endpoint", endpoint, "--trace", "lphd", "--max-requests", "6",
               "--rate", "50", "--max-model-len", "1024", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())["replay"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    records = [json.loads(line) for line in (out / "replay.records.jsonl").read_text().splitlines()]
    assert len(records) == 6
    # Output length is forced: the server streamed exactly max_tokens tokens per request.
    assert [r["output_tokens"] for r in records] == [r["max_tokens"] for r in records]
    assert summary["total_output_tokens"] == sum(r["max_tokens"] for r in records)
    # LPHD: every request decodes heavily (> 128 tokens before scaling into 1024 tokens).
    config = json.loads((out / "config.json").read_text())
    scale = config["workload"]["length_scale"]
    assert all(r["max_tokens"] > 128 * scale - 1 for r in records)
    assert all(r["prompt_tokens"] <= 512 * scale + 1 for r in records)
    assert 0 < summary["mean_ttft_ms"] < 1000
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pngs)


def test_replay_follows_trace_timestamps_scaled(endpoint: str, tmp_path: Path) -> None:
    out = tmp_path / "azure"
    rc = main(["replay", "--endpoint", endpoint, "--trace", "azure2023-code",
               "--time-scale", "20", "--max-requests", "4", "--max-model-len", "512",
               "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in (out / "replay.records.jsonl").read_text().splitlines()]
    scheduled = [r["scheduled_at_s"] for r in records]
    assert scheduled[0] == 0.0 and scheduled == sorted(scheduled)
    # Each request left when the (20x faster) trace said, not after the previous answer.
    assert all(abs(r["sent_at_s"] - r["scheduled_at_s"]) < 0.2 for r in records)


@pytest.mark.parametrize(("argv", "names"), [
    (["replay", "--endpoint", "http://127.0.0.1:9", "--trace", "mixed", "--rate", "-1"],
     "--rate"),
    (["replay", "--endpoint", "http://127.0.0.1:9", "--trace", "mixed", "--max-requests",
      "0"], "--max-requests"),
    (["compare", "--trace", "mixed", "--kv-cache-gib", "0"], "--kv-cache-gib"),
])
def test_bad_flag_values_are_named(argv: list[str], names: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert names in capsys.readouterr().err


def test_unknown_system_and_trace_are_refused(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--systems", "shuffleinfer,sglang", "--trace", "mixed",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sglang" in err and "vllm-rr" in err
    assert main(["replay", "--endpoint", "http://127.0.0.1:9", "--trace", "nosuch",
                 "--max-model-len", "512", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "mooncake" in err


def test_malformed_trace_names_file_and_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "2023-11-16 18:15:46.6805900,100,20\n"
                   "2023-11-16 18:15:47.0000000,lots,20\n")
    assert main(["replay", "--endpoint", "http://127.0.0.1:9", "--trace", f"azure:{bad}",
                 "--max-model-len", "512", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and ":3:" in err


def test_compare_prepares_its_systems_without_ray(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # compare starts each system as its own process: it must settle the dtype and the
    # workload here, without a Ray cluster (it once asked Ray whether there were GPUs).
    import ray

    import benchmarks.compare as compare

    seen = {}

    class Stop(Exception):
        pass

    def run_system(name, workload, builder, settings, args):  # noqa: ANN001, ANN202
        seen.update(name=name, dtype=settings.dtype, requests=len(workload.requests))
        raise Stop

    monkeypatch.setattr(compare, "run_system", run_system)
    with pytest.raises(Stop):
        main(["compare", "--systems", "vllm", "--trace", "mixed", "--max-requests", "3",
              "--out", str(tmp_path)])
    assert seen == {"name": "vllm", "dtype": "float32", "requests": 3}
    assert not ray.is_initialized()
