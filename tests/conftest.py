"""Suite-wide: tests marked `gpu` skip on machines without a CUDA device; the simulator's
sources run, not a compiled build of them (`shuffleinfer/sim/compiled.py`: one test
compares the two)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

os.environ["SHUFFLEINFER_SIM_COMPILED"] = "0"  # before any test imports shuffleinfer.sim


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
