"""Helpers shared by the offline checks of deploy/ and docker/: paths, pins, CRD schemas,
Dockerfile parsing, pool capacity and `shuffleinfer serve` option parsing."""

from __future__ import annotations

import json
import math
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shuffleinfer.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
REQUIREMENTS = DOCKER / "requirements.txt"
KUBERAY_CRDS = REPO.parent / "shared/data/schemas/kuberay-v1.7.0"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler/ray-schema.json"

def yaml_docs(path: Path) -> list[dict[str, Any]]:
    """The non-empty documents of a (multi-document) YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pyproject() -> dict[str, Any]:
    """The repository's pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_requirements(path: Path = REQUIREMENTS) -> dict[str, Requirement]:
    """A requirements file's lines by canonical name; fails on any line not pinned with ==."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        assert is_pinned(req), f"{path.name}: {line!r} is not pinned with =="
        pins[canonicalize_name(req.name)] = req
    return pins


def is_pinned(req: Requirement) -> bool:
    """True for `name==version` (one exact version, no wildcard)."""
    specs = list(req.specifier)
    return len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version


def pinned_version(req: Requirement) -> str:
    """The version of a requirement pinned with ==."""
    return next(iter(req.specifier)).version


def pip_install_args(command: str) -> Iterator[list[str]]:
    """The arguments after `pip install` of each pip install in a shell command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for word in [*lexer, ";"]:
        if word and set(word) <= set("&|;()<>"):  # an operator ends a simple command
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    yield words[i + 2:]
                    break
            words = []
        else:
            words.append(word)


_OPTIONS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "--extra-index-url",
                       "--index-url", "-i", "--find-links", "-f"}


def unpinned_pip_args(args: list[str], local_paths: Mapping[str, Path]) -> list[str]:
    """What in one `pip install` is not pinned: requirements without ==, requirement files
    with an unpinned line, or a local project installed with its dependencies.

    `local_paths` maps the paths this install may name (requirement files, the project) to
    their copies in this repository.
    """
    problems, no_deps, i = [], "--no-deps" in args, 0
    while i < len(args):
        arg = args[i]
        if arg in {"-r", "--requirement"}:
            path = local_paths.get(args[i + 1])
            if path is None:
                problems.append(f"unknown requirements file {args[i + 1]}")
            else:
                pinned_requirements(path)  # fails on an unpinned line
        if arg in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-"):
            pass
        elif arg in local_paths:
            if not no_deps:
                problems.append(f"{arg} installed with its (unpinned) dependencies")
        elif not is_pinned(Requirement(arg)):
            problems.append(arg)
        i += 1
    return problems


@cache
def kuberay_schema(kind: str, api_version: str) -> dict[str, Any]:
    """The KubeRay v1.7.0 CRD schema of `kind` at `api_version`, made strict: an object
    schema that lists its properties rejects others, as the API server's strict field
    validation does (without it, the server prunes unknown fields silently, typos included).
    """
    path = KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml"
    # libyaml when PyYAML has it: the CRD files are megabytes.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    versions = {f"{crd['spec']['group']}/{v['name']}": v for v in crd["spec"]["versions"]}
    return _strict(versions[api_version]["schema"]["openAPIV3Schema"])


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def ray_schema() -> dict[str, Any]:
    """The cluster launcher's JSON schema shipped with the installed Ray."""
    return json.loads(RAY_SCHEMA.read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    result = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def instances_per_node(offered: Mapping[str, float], labels: Mapping[str, str],
                       config: ServeConfig, role: Literal["prefill", "decode"]) -> int:
    """How many `role` instances of `config` a Ray node with these resources and labels can
    hold, by what the runtime really asks Ray for on a GPU cluster (its custom resources,
    CPUs and GPUs; all of a tensor-parallel instance's GPUs on one node) and the node
    labels it selects."""
    # Imported here: it pulls in vLLM, which takes seconds.
    from shuffleinfer.runtime.placement import instance_placement

    placement = instance_placement(config, role, 0, gpu=True)
    for key, value in placement.label_selector.items():
        assert re.fullmatch(r"[\w.-]+", value), f"not an equality selector: {key}={value}"
        if labels.get(key) != value:
            return 0
    if placement.needs_placement_group:  # STRICT_PACK: every bundle on this node
        wanted: dict[str, float] = {}
        for bundle in placement.bundles():
            for name, amount in bundle.items():
                wanted[name] = wanted.get(name, 0.0) + amount
    else:
        options = placement.actor_options()
        wanted = {"CPU": options["num_cpus"], "GPU": options["num_gpus"],
                  **options.get("resources", {})}
    return min(math.floor(offered.get(name, 0.0) / amount)
               for name, amount in wanted.items() if amount > 0)


def serve_config_from_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> ServeConfig:
    """The ServeConfig `shuffleinfer serve ARGV...` would start with (nothing starts)."""
    import shuffleinfer.serve
    from shuffleinfer import cli

    started: list[ServeConfig] = []
    monkeypatch.setattr(shuffleinfer.serve, "serve", lambda config: started.append(config) or 0)
    assert cli.main(argv) == 0
    assert len(started) == 1
    return started[0]
