"""`python -m benchmarks.paper_table` end to end on a small run: every class, the changes
computed from the means it reports, the paper's numbers beside them, and bad flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.paper_table import CLASSES, class_requests, main
from benchmarks.records import TraceRequest
from benchmarks.replay import DEFAULT_DATA_DIR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_small_table_reports_every_class_beside_the_paper(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--requests", "40", "--instances", "3"]) == 0
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert list(rows) == list(CLASSES)
    for row in rows.values():
        v, ours = row["vllm"], row["shuffleinfer"]
        assert row["requests"] == 40 and ours["instances"] == 3
        assert ours["split"] in ("1p2d", "2p1d")
        assert 0 < row["rate"] < row["vllm_capacity"]
        for key, field in (("ttft", "mean_ttft_s"), ("jct", "mean_jct_s")):
            assert row["change_pct"][key] == pytest.approx(
                100 * (ours[field] - v[field]) / v[field])
    assert (tmp_path / "paper_table.png").read_bytes().startswith(PNG_SIGNATURE)
    out = capsys.readouterr().out
    lphd = next(line for line in out.splitlines() if line.startswith("lphd"))
    means = f"{rows['lphd']['vllm']['mean_ttft_s'] * 1e3:.0f}/" \
            f"{rows['lphd']['shuffleinfer']['mean_ttft_s'] * 1e3:.0f}"
    assert means in lphd and "-97 %, -47 %, -38 %" in lphd


@pytest.mark.parametrize("argv", [["--load", "1.5"], ["--instances", "1"],
                                  ["--requests", "5"]])
def test_bad_flags_exit_2(tmp_path: Path, argv: list[str],
                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert "--requests >= 10, --instances >= 2 and 0 < --load < 1" in capsys.readouterr().err


def test_more_requests_than_a_class_has_repeat_it_in_new_orders() -> None:
    args = argparse.Namespace(requests=40, seed=0, data_dir=DEFAULT_DATA_DIR)
    sample, _, distinct = class_requests("lpld", args)
    assert len(sample) == 40 < distinct  # a sample without replacement
    args.requests = 2 * distinct + 5
    drawn, scale, again = class_requests("lpld", args)
    assert again == distinct and len(drawn) == args.requests and scale > 0
    first, second = drawn[:distinct], drawn[distinct:2 * distinct]

    def key(r: TraceRequest) -> tuple[int, int]:
        return r.prompt_tokens, r.output_tokens

    assert sorted(map(key, first)) == sorted(map(key, second))  # every request, each round
    assert list(map(key, first)) != list(map(key, second))  # in a new order
    assert class_requests("lpld", args)[0] == drawn  # the same under the same seed
