"""The transport benchmark runs end to end on a tiny hand-over and prints both transports."""

from __future__ import annotations

import pytest

from shuffleinfer.kv import bench

pytestmark = pytest.mark.timeout(120)


def test_bench_hands_over_by_tcp_and_shm_and_prints_the_ratio(
        capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--mib", "1", "--rounds", "1", "--block-size", "16"])
    out = capsys.readouterr().out
    assert "tcp" in out and "shm" in out and "shm / tcp" in out
    assert "block [3, 16, 128] float32" in out
