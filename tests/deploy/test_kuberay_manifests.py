"""deploy/kuberay: every manifest valid against its schema (KubeRay v1.7.0 CRDs, Kubernetes'
own for built-in kinds), pods within the `restricted` Pod Security Standard, and the pieces
agreeing with each other and with `shuffleinfer serve`. Offline: no cluster."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from deploy_files import (
    DEPLOY,
    instances_per_node,
    kuberay_schema,
    pinned_requirements,
    pinned_version,
    serve_config_from_cli,
    yaml_docs,
)
from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

from shuffleinfer.config import ServeConfig, load_config

KUBERAY = DEPLOY / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
# The oldest Kubernetes release still commonly offered by managed services, and the newest
# whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml_docs(path)]


def the(kind: str) -> dict[str, Any]:
    """The one manifest of `kind` in deploy/kuberay."""
    found = [doc for _, doc in all_docs() if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def crd_errors(doc: dict[str, Any]) -> list[str]:
    schema = kuberay_schema(doc["kind"], doc["apiVersion"])
    return [f"{list(e.path)}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def cluster_specs() -> dict[str, dict[str, Any]]:
    """The RayCluster specs: raycluster.yaml's, and the RayService's rayClusterConfig."""
    return {"RayCluster": the("RayCluster")["spec"],
            "RayService": the("RayService")["spec"]["rayClusterConfig"]}


def pod_templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name ("head" for the head group) -> its pod template, of a RayCluster spec."""
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return templates


def test_manifests_exist() -> None:
    kinds = sorted(doc["kind"] for _, doc in all_docs())
    assert kinds == ["ConfigMap", "RayCluster", "RayJob", "RayService", "Service"]


@pytest.mark.parametrize(("path", "doc"), all_docs(),
                         ids=[f"{p.name}:{d['kind']}" for p, d in all_docs()])
@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
def test_manifest_is_valid(path: Path, doc: dict[str, Any], k8s_version: str) -> None:
    if doc["apiVersion"].startswith("ray.io/"):
        assert crd_errors(doc) == []
    else:
        kubernetes_validate.validate(doc, k8s_version, strict=True)


def test_crd_check_rejects_typos_and_wrong_types() -> None:
    """The CRD check is live: fields the API server would drop or refuse are caught."""
    broken = copy.deepcopy(the("RayCluster"))
    broken["spec"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    broken["spec"]["workerGroupSpecs"][1]["resources"] = {"decode_pool": 1}
    container = broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["runAsNonRot"] = True
    assert len(crd_errors(broken)) == 3, crd_errors(broken)

    service = copy.deepcopy(the("RayService"))
    service["spec"]["serveConfig"] = service["spec"].pop("serveConfigV2")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert len(crd_errors(service)) == 2, crd_errors(service)


@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
def test_pod_templates_are_valid_kubernetes_pods(kind: str, k8s_version: str) -> None:
    """The groups' pod templates against Kubernetes' own PodTemplate schema as well."""
    for group, template in pod_templates(cluster_specs()[kind]).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"shuffleinfer-{group}"}, "template": template}
        kubernetes_validate.validate(pod_template, k8s_version, strict=True)


@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
def test_pods_meet_the_restricted_pod_security_standard(kind: str) -> None:
    for group, template in pod_templates(cluster_specs()[kind]).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, group
        assert pod["securityContext"]["runAsUser"] != 0, group
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", group
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), group
        assert not any("hostPath" in volume for volume in pod.get("volumes", [])), group
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, group
            assert security["capabilities"]["drop"] == ["ALL"], group
            assert not security.get("privileged"), group
            assert container["readinessProbe"] and container["livenessProbe"], group


def test_worker_groups_split_gpus_into_a_prefill_and_a_decode_pool() -> None:
    groups = {g["groupName"]: g for g in the("RayCluster")["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for pool, group in groups.items():
        assert group["labels"] == {"shuffleinfer.io/pool": pool}
        validate_node_label_syntax(group["labels"])
        validate_node_labels(group["labels"])
        assert set(group["resources"]) == {f"{pool}_pool"}
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
def test_cluster_uses_ray_token_auth(kind: str) -> None:
    assert cluster_specs()[kind]["authOptions"] == {"mode": "token"}


@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
def test_ray_version_matches_the_image_and_the_tested_ray(kind: str) -> None:
    ray_pin = pinned_version(pinned_requirements()["ray"])
    assert cluster_specs()[kind]["rayVersion"] == ray_pin == ray.__version__


def test_job_service_and_config_map_point_at_the_cluster() -> None:
    cluster, job, service = the("RayCluster"), the("RayJob"), the("Service")
    name = cluster["metadata"]["name"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}
    # Without a submitter pod; the cluster is not torn down when the job stops.
    assert job["spec"]["submissionMode"] == "HTTPMode"
    assert job["spec"]["shutdownAfterJobFinishes"] is False
    assert service["spec"]["selector"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert ports["http"] == service["spec"]["ports"][0]["port"] == 8000
    config_maps = [v["configMap"]["name"] for v in head["volumes"] if "configMap" in v]
    assert config_maps == [the("ConfigMap")["metadata"]["name"]]


def test_rayjob_entrypoint_serves_the_config_map_on_the_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, job, config_map = the("RayCluster"), the("RayJob"), the("ConfigMap")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m["mountPath"] for m in head["containers"][0]["volumeMounts"]
                 if m["name"] == "serve-config")
    # The file the head pod sees, at a local path.
    (tmp_path / "serve.yaml").write_text(config_map["data"]["serve.yaml"])
    argv = job["spec"]["entrypoint"].replace(mount, str(tmp_path)).split()
    assert argv[0] == "shuffleinfer"
    config = serve_config_from_cli(argv[1:], monkeypatch)
    assert config.address == "auto" and config.host == "0.0.0.0" and config.port == 8000
    assert_instances_fit_their_pools(cluster["spec"], config)


def assert_instances_fit_their_pools(spec: dict[str, Any], config: ServeConfig) -> None:
    """The prefill and decode instances of `config` fit on, and only on, their own worker
    group of the RayCluster `spec`."""
    for pool, wanted in (("prefill", config.num_prefill), ("decode", config.num_decode)):
        capacity = {}
        for group in spec["workerGroupSpecs"]:
            # KubeRay gives the Ray node the container's CPU and GPU limits.
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            offered = {k: float(v) for k, v in group["resources"].items()}
            offered["CPU"] = float(limits["cpu"])
            offered["GPU"] = float(limits["nvidia.com/gpu"])
            per_pod = instances_per_node(offered, group["labels"], config, pool)
            capacity[group["groupName"]] = per_pod * group["replicas"]
        assert {g for g, n in capacity.items() if n} == {pool}, capacity
        assert capacity[pool] >= wanted


def test_config_map_matches_the_launcher_serve_config() -> None:
    """One cluster shape for both deployments: the two copies must not drift apart."""
    in_cluster = yaml.safe_load(the("ConfigMap")["data"]["serve.yaml"])
    assert in_cluster == yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())


def serve_deploy_config() -> dict[str, Any]:
    """The RayService's serveConfigV2, parsed."""
    return yaml.safe_load(the("RayService")["spec"]["serveConfigV2"])  # type: ignore[no-any-return]


def test_rayservice_serve_config_is_valid_for_ray_serve() -> None:
    """serveConfigV2 through Ray Serve's own schema of `serve deploy` configs (what the
    dashboard that KubeRay submits it to parses), and the proxy where the Service looks."""
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    config = serve_deploy_config()
    # The schema ignores unknown keys: a typo would drop an option silently.
    assert set(config) <= set(ServeDeploySchema.model_fields)
    assert all(set(app) <= set(ServeApplicationSchema.model_fields)
               for app in config["applications"])
    schema = ServeDeploySchema.model_validate(config)
    [app] = schema.applications
    assert app.import_path == "shuffleinfer.runtime.serve_app:build"
    assert app.route_prefix == "/"
    assert schema.proxy_location.value == "HeadOnly"
    head = the("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    # KubeRay's serve Service targets the head container's port named `serve`.
    assert ports["serve"] == schema.http_options.port == 8000
    assert schema.http_options.host == "0.0.0.0"


def test_rayservice_args_are_the_launcher_serve_config_and_build_the_app() -> None:
    """The app's args: serve-config.yaml's options but Serve's own host and port; they
    pass ServeConfig and make a Serve application; a typo is an error naming it."""
    from pydantic import ValidationError
    from ray.serve import Application

    from shuffleinfer.runtime.serve_app import build

    [app] = serve_deploy_config()["applications"]
    launcher = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    assert app["args"] == {k: v for k, v in launcher.items() if k not in {"host", "port"}}
    assert isinstance(build(app["args"]), Application)
    with pytest.raises(ValidationError, match="num_prefil"):
        build({**app["args"], "num_prefil": 2})


def test_rayservice_instances_fit_their_pools() -> None:
    [app] = serve_deploy_config()["applications"]
    config = load_config(None, app["args"])
    assert config.address == "auto"  # KV servers bind each node's own address
    assert_instances_fit_their_pools(the("RayService")["spec"]["rayClusterConfig"], config)


def test_rayservice_cluster_is_the_raycluster() -> None:
    """One cluster shape for both KubeRay deployments: the same worker groups, and the same
    head but for its api port (Serve's proxy) and the ConfigMap the RayJob reads."""
    service, cluster = the("RayService")["spec"]["rayClusterConfig"], the("RayCluster")["spec"]
    assert service["workerGroupSpecs"] == cluster["workerGroupSpecs"]
    service_head = copy.deepcopy(service["headGroupSpec"])
    cluster_head = copy.deepcopy(cluster["headGroupSpec"])
    for head in (service_head, cluster_head):
        pod = head["template"]["spec"]
        pod["containers"][0]["ports"] = [p for p in pod["containers"][0]["ports"]
                                         if p["containerPort"] != 8000]
        pod["containers"][0]["volumeMounts"] = [m for m in pod["containers"][0]["volumeMounts"]
                                                if m["name"] != "serve-config"]
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "serve-config"]
    assert service_head == cluster_head
    assert {k: v for k, v in service.items() if k not in {"headGroupSpec", "workerGroupSpecs"}} \
        == {k: v for k, v in cluster.items() if k not in {"headGroupSpec", "workerGroupSpecs"}}
