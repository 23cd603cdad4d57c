"""deploy/ray-cluster.yaml: valid for Ray's cluster launcher, pinned, and able to host the
prefill and decode pools that deploy/serve-config.yaml asks for. Offline: no cloud."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from deploy_files import (
    DEPLOY,
    REPO,
    REQUIREMENTS,
    instances_per_node,
    pinned_requirements,
    pinned_version,
    pip_install_args,
    pyproject,
    ray_schema,
    serve_config_from_cli,
    unpinned_pip_args,
)
from ray._private.label_utils import (
    validate_label_selector,
    validate_node_label_syntax,
    validate_node_labels,
)
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = DEPLOY / "ray-cluster.yaml"
SERVE_YAML = DEPLOY / "serve-config.yaml"


@pytest.fixture
def cluster() -> dict[str, Any]:
    """The launcher config as `ray up` reads it."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def schema_errors(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(config)]


def test_cluster_config_passes_rays_own_schema_and_checks(cluster: dict[str, Any]) -> None:
    assert schema_errors(cluster) == []
    validate_config(cluster)
    # What `ray up` does before launching: merge the provider's defaults, validate again.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_rejects_a_broken_config(cluster: dict[str, Any]) -> None:
    """The check above is live: typical mistakes fail it."""
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["prefill.gpu"]["resources"]["prefill_pool"] = "1"
    broken["available_node_types"]["decode.gpu"]["label"] = {"shuffleinfer.io/pool": "decode"}
    broken["head_start_ray_command"] = []
    errors = schema_errors(broken)
    assert len(errors) == 3, errors


def test_node_labels_are_valid_ray_labels(cluster: dict[str, Any]) -> None:
    for node_type in cluster["available_node_types"].values():
        labels = node_type.get("labels", {})
        validate_node_label_syntax(labels)
        validate_node_labels(labels)


def test_every_file_mount_exists_in_the_repository(cluster: dict[str, Any]) -> None:
    for remote, local in mounted_paths(cluster).items():
        assert local.exists(), f"{remote}: {local} missing"


def mounted_paths(cluster: dict[str, Any]) -> dict[str, Path]:
    """Remote paths of the file mounts from this repository -> their local copies."""
    return {remote: REPO / local for remote, local in cluster["file_mounts"].items()
            if not local.startswith("~")}


def test_every_node_runs_ray_with_token_auth(cluster: dict[str, Any]) -> None:
    """The launcher copies the user's Ray token to every node, and every `ray start` and
    login shell runs in token mode: no one without the token can submit work."""
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in (DEPLOY / "README.md").read_text()
    starts = [c for c in cluster["head_start_ray_commands"] + cluster[
        "worker_start_ray_commands"] if " start " in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ~/venv/bin/ray start" in c for c in starts), starts
    assert any("export RAY_AUTH_MODE=token" in c for c in cluster["setup_commands"])


def test_setup_commands_pin_every_package(cluster: dict[str, Any]) -> None:
    commands = (cluster["setup_commands"] + cluster["head_setup_commands"]
                + cluster["worker_setup_commands"])
    installs = [args for command in commands for args in pip_install_args(command)]
    assert installs, "no pip install in the setup commands"
    local = mounted_paths(cluster)
    # The project itself, installed from its mounted pyproject.toml and package.
    assert {"~/shuffleinfer/pyproject.toml", "~/shuffleinfer/shuffleinfer"} <= set(local)
    local["~/shuffleinfer"] = REPO
    for args in installs:
        assert unpinned_pip_args(args, local) == [], args
    requirements = [local[args[args.index("-r") + 1]] for args in installs if "-r" in args]
    assert requirements == [REQUIREMENTS]
    # The GPU build the package itself pins, and the Ray this config was checked against.
    (gpu_pin,) = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert any(gpu_pin in args for args in installs), gpu_pin
    assert pinned_version(pinned_requirements()["ray"]) == ray.__version__


def test_ray_start_commands_use_the_pinned_ray(cluster: dict[str, Any]) -> None:
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        assert "~/venv/bin/ray " in command, command


def test_serve_config_joins_the_cluster_and_fits_its_pools(
    cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = serve_config_from_cli(["serve", "--config", str(SERVE_YAML)], monkeypatch)
    assert config.address == "auto" and config.host == "0.0.0.0"
    assert mounted_paths(cluster)["~/shuffleinfer/deploy/serve-config.yaml"] == SERVE_YAML
    for pool in ("prefill", "decode"):
        assert validate_label_selector(getattr(config, f"{pool}_node_labels")) is None

    node_types = cluster["available_node_types"]
    head = node_types[cluster["head_node_type"]]
    for pool, wanted in (("prefill", config.num_prefill), ("decode", config.num_decode)):
        per_node = {name: instances_per_node(t["resources"], t.get("labels", {}), config, pool)
                    for name, t in node_types.items()}
        hosts = [name for name, n in per_node.items() if n > 0]
        assert hosts == [f"{pool}.gpu"], (pool, per_node)
        # Enough room for every instance at the minimum size, without waiting to scale.
        assert sum(per_node[n] * node_types[n].get("min_workers", 0) for n in hosts) >= wanted
        assert instances_per_node(head["resources"], head.get("labels", {}), config, pool) == 0
    # The check is live: two GPUs per instance do not fit these one-GPU nodes.
    prefill = node_types["prefill.gpu"]
    tensor_parallel = config.model_copy(update={"gpus_per_instance": 2})
    assert instances_per_node(prefill["resources"], prefill["labels"], tensor_parallel,
                              "prefill") == 0


def test_guide_serve_command_places_like_the_serve_config(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flags shown in deploy/README.md mean what serve-config.yaml says."""
    guide = (DEPLOY / "README.md").read_text()
    start = guide.index("shuffleinfer serve --address auto")
    command = guide[start:guide.index("```", start)].replace("\\\n", " ")
    argv = shlex.split(command)
    from_flags = serve_config_from_cli(argv[1:], monkeypatch)
    from_file = serve_config_from_cli(["serve", "--config", str(SERVE_YAML)], monkeypatch)
    placement = ["model", "address", "host", "num_prefill", "num_decode", "gpus_per_instance",
                 "prefill_resources", "decode_resources", "prefill_node_labels",
                 "decode_node_labels", "max_restarts", "kv_transport"]
    assert from_flags.model_dump(include=set(placement)) == from_file.model_dump(
        include=set(placement))
