"""The simulator's mypyc build (`shuffleinfer/sim/compiled.py`): it gives the sources'
results, loads only for the sources it was built from, and can be turned off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shuffleinfer.sim import compiled

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cache: Path, on: bool) -> str:
    env = os.environ | {"SHUFFLEINFER_CACHE_DIR": str(cache), compiled.ENV: "1" if on else "0"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="building needs a C compiler")
def test_the_compiled_simulator_writes_the_sources_records(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    built = compiled.build(cache_root=cache)
    assert built == compiled.build_dir(cache) and built.is_dir()
    which = "import shuffleinfer.sim.simulator as s, shuffleinfer.sim.instance as i; " \
            "print(s.__file__, i.__file__)"
    assert _run(["-c", which], cache, on=True).split() == [
        _so(built, m) for m in ("simulator", "instance")]
    assert _run(["-c", which], cache, on=False).split() == [
        str(ROOT / "shuffleinfer" / "sim" / f"{m}.py") for m in ("simulator", "instance")]
    # One process with flips, KV pressure and a colocated baseline; then a split run.
    runs = {"one": ["--cluster", "2p3d,vllm:4", "--flip-policy", "idle_or_imbalance",
                    "--admission", "reserve_dynamic", "--kv-capacity-tokens", "30000",
                    "--workers", "1"],
            "split": ["--cluster", "3p3d", "--workers", "2"]}
    for name, extra in runs.items():
        records = {}
        for on in (True, False):
            out = tmp_path / f"{name}-{on}"
            _run(["-m", "shuffleinfer", "simulate", "--trace", "azure2023-conv",
                  "--max-requests", "600", "--decode-policy", "shuffle",
                  "--oracle-accuracy", "0.75", "--data-dir", str(DATA), "--max-model-len",
                  "4096", "--out", str(out), *extra], cache, on)
            records[on] = {p.name: p.read_text() for p in sorted(out.glob("*.records.jsonl"))}
        assert records[True] == records[False]
        assert records[True] and all(len(r.splitlines()) == 600 for r in records[True].values())


def _so(built: Path, module: str) -> str:
    (found,) = (built / "shuffleinfer" / "sim").glob(f"{module}.*.so")
    return str(found)


def test_a_build_is_for_its_sources_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    sources = tmp_path / "sim"
    shutil.copytree(ROOT / "shuffleinfer" / "sim", sources)
    monkeypatch.setattr(compiled, "_HERE", sources)
    monkeypatch.setattr(sys, "path", list(sys.path))  # activate adds to it
    before = compiled.key()
    (sources / "instance.py").write_text((sources / "instance.py").read_text() + "\n# edited\n")
    assert compiled.key() != before
    # A build of other sources is not put on the package's path, nor is one turned off.
    monkeypatch.setenv("SHUFFLEINFER_CACHE_DIR", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "sim-compiled" / before / "shuffleinfer" / "sim"
    stale.mkdir(parents=True)
    path: list[str] = ["src"]
    monkeypatch.setenv(compiled.ENV, "1")
    assert compiled.activate(path) is None and path == ["src"]
    current = compiled.build_dir() / "shuffleinfer" / "sim"
    current.mkdir(parents=True)
    assert compiled.activate(path) == compiled.build_dir() and path == [str(current), "src"]
    monkeypatch.setenv(compiled.ENV, "0")
    assert compiled.activate(path) is None and path == ["src"]
