"""`python -m benchmarks kv` runs end to end on tiny hand-overs: every transport in both
modes beside its limit, in the table, summary.json and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import main

pytestmark = pytest.mark.timeout(180)


def test_kv_benchmark_puts_each_transport_beside_its_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv", "--out", str(tmp_path), "--tokens", "16,40", "--rounds", "1",
                 "--block-size", "16", "--skip-overhead"]) == 0
    out = capsys.readouterr().out
    assert "memcpy" in out and "raw socket" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["transports"]) == {"tcp", "shm"}
    for modes in summary["transports"].values():
        assert set(modes) == {"whole", "overlap"}
        for sizes in modes.values():
            assert set(sizes) == {"16", "40"}
            assert sizes["40"]["blocks"] == 3
            assert sizes["40"]["bytes"] == 3 * summary["block_bytes"]
            for row in sizes.values():
                assert row["gbps"] > 0 and row["limit_gbps"] > 0
                assert row["ratio"] == pytest.approx(row["gbps"] / row["limit_gbps"])
    assert (tmp_path / "kv.png").stat().st_size > 0


def test_bad_sizes_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["kv", "--out", "x", "--tokens", "0"])
    assert "--tokens" in capsys.readouterr().err
