"""The simulator's hot modules compiled with mypyc, used when a build of these very sources
exists.

    python -m shuffleinfer.sim.compiled      (or: make sim-compiled)

compiles `MODULES` (the event loop, the instances, their timing, the view board and the
requests: where a run spends its time) into `<cache>/sim-compiled/<key>/`, where the
cache is `$SHUFFLEINFER_CACHE_DIR` or `~/.cache/shuffleinfer` and the key a hash of those
sources and of the Python ABI. On import, `shuffleinfer.sim` puts that directory ahead of
its own on the package's path when it exists (`activate`), so `import
shuffleinfer.sim.instance` loads the compiled module. Any edit to those sources changes
the key: a stale build is never loaded, the sources run until the next build. Nothing
else changes: the policies, the cost model and the CLI stay Python, and imports from
outside the compiled modules are typed as Any (`--follow-imports=skip`; type-checking
the whole import graph made a build take 5 minutes instead of 15 s).

The sources stay the reference: the test suite runs them (`SHUFFLEINFER_SIM_COMPILED=0`,
set in tests/conftest.py), and `tests/sim/test_compiled.py` builds the compiled modules
and checks that `shuffleinfer simulate` writes the same records with and without them.
mypyc comes with mypy (a dev dependency); building needs a C compiler.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = ("request", "timing", "views", "instance", "simulator")
"""Modules of `shuffleinfer.sim` that are compiled (each imports only these, or modules
that stay Python)."""
ENV = "SHUFFLEINFER_SIM_COMPILED"
"""Set to 0 to run the sources even when a build exists."""
_HERE = Path(__file__).resolve().parent


def key() -> str:
    """What a build is for: the compiled sources and this Python's ABI."""
    digest = hashlib.sha256(sys.implementation.cache_tag.encode())
    for name in MODULES:
        digest.update((_HERE / f"{name}.py").read_bytes())
    return digest.hexdigest()[:20]


def build_dir(cache_root: Path | None = None) -> Path:
    """Where the build of the current sources lives (whether or not it exists)."""
    from shuffleinfer.model.prepare import cache_root as default_root

    return (cache_root or default_root()) / "sim-compiled" / key()


def activate(package_path: list[str]) -> Path | None:
    """Called by `shuffleinfer/sim/__init__.py` with its `__path__`: put the build of the
    current sources ahead on it, if there is one and `ENV` is not 0, and return the
    build's directory; else None (taking the build off the path if `ENV` is 0 now).
    Later imports of the compiled modules then load the build; any imported before stay
    as they are."""
    where = build_dir()
    package = where / "shuffleinfer" / "sim"
    if os.environ.get(ENV, "1") == "0" or not package.is_dir():
        if str(package) in package_path:  # turned off since
            package_path.remove(str(package))
        return None
    if str(package) not in package_path:
        package_path.insert(0, str(package))
        sys.path.append(str(where))  # mypyc's runtime for the group, a top-level module
    return where


def in_use() -> bool:
    """Whether the simulator's modules imported so far (and from now on) are compiled."""
    import shuffleinfer.sim.simulator as simulator

    return not simulator.__file__.endswith(".py") if simulator.__file__ else False


_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
setup(name="shuffleinfer-sim-compiled", script_args=sys.argv[1:], ext_modules=mypycify(
    ["--follow-imports=skip", *{paths!r}], opt_level="3", debug_level="0",
    target_dir={target!r}))
"""


def build(cache_root: Path | None = None) -> Path:
    """Compile `MODULES` into `build_dir(cache_root)` (replacing an unfinished one);
    returns it. Raises RuntimeError, with the compiler's output, if the build fails."""
    dest = build_dir(cache_root)
    if (dest / "shuffleinfer" / "sim").is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    root = _HERE.parent.parent  # the directory holding the `shuffleinfer` package
    paths = [f"shuffleinfer/sim/{name}.py" for name in MODULES]
    with tempfile.TemporaryDirectory(prefix="sim-compiled-", dir=dest.parent) as tmp:
        out = Path(tmp) / "lib"
        setup = _SETUP.format(paths=paths, target=str(Path(tmp) / "c"))
        done = subprocess.run(
            [sys.executable, "-c", setup, "build_ext", "--build-lib", str(out),
             "--build-temp", str(Path(tmp) / "o")],
            cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the simulator failed (exit code "
                               f"{done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        shutil.rmtree(dest, ignore_errors=True)
        out.rename(dest)  # whole, or not at all
    return dest


def main() -> int:
    print(f"compiling {', '.join(MODULES)} of shuffleinfer.sim with mypyc ...",
          file=sys.stderr, flush=True)
    try:
        print(build())
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
