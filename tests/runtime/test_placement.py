"""Where instance actors go: pool resources and labels, cores, GPUs, restarts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shuffleinfer.cli import main
from shuffleinfer.config import ServeConfig
from shuffleinfer.runtime.cluster import instance_specs, kv_bind_host
from shuffleinfer.runtime.placement import gpu_engine_args, instance_placement

POOLS = ServeConfig(num_prefill=1, num_decode=2,
                    prefill_resources={"prefill_pool": 1},
                    decode_node_labels={"shuffleinfer.io/pool": "decode"}, max_restarts=3)


def test_each_role_asks_for_its_own_pool() -> None:
    prefill = instance_placement(POOLS, "prefill", 0, gpu=False, num_cores=4)
    decode = instance_placement(POOLS, "decode", 1, gpu=False, num_cores=4)
    assert prefill.actor_options()["resources"] == {"prefill_pool": 1}
    assert "label_selector" not in prefill.actor_options()
    assert decode.actor_options()["label_selector"] == {"shuffleinfer.io/pool": "decode"}
    assert "resources" not in decode.actor_options()
    assert prefill.actor_options()["max_restarts"] == decode.actor_options()["max_restarts"] == 3


def test_cpu_instances_get_their_own_cores_and_no_gpu() -> None:
    config = ServeConfig(num_prefill=2, num_decode=2, cpus_per_instance=2, kv_cache_gib=3)
    envs = [instance_placement(config, "prefill", i, gpu=False, num_cores=8).env_vars
            for i in range(4)]
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0,1", "2,3", "4,5", "6,7"]
    assert {e["VLLM_CPU_KVCACHE_SPACE"] for e in envs} == {"3"}
    options = instance_placement(config, "decode", 0, gpu=False, num_cores=8).actor_options()
    assert (options["num_cpus"], options["num_gpus"]) == (2, 0)


def test_one_gpu_instance_takes_a_gpu_and_no_placement_group() -> None:
    placement = instance_placement(POOLS, "decode", 1, gpu=True)
    assert placement.actor_options()["num_gpus"] == 1
    assert not placement.needs_placement_group
    assert gpu_engine_args(placement) == {}
    assert placement.env_vars == {}  # no CPU core binding on GPU nodes


def test_tensor_parallel_instance_packs_its_gpus_on_one_node() -> None:
    config = ServeConfig(gpus_per_instance=4, prefill_resources={"prefill_pool": 1})
    placement = instance_placement(config, "prefill", 0, gpu=True)
    assert placement.needs_placement_group
    bundles = placement.bundles()
    assert len(bundles) == 4 and all(b["GPU"] == 1 for b in bundles)
    assert bundles[0]["prefill_pool"] == 1  # the pool's resource is asked for once
    assert gpu_engine_args(placement) == {"tensor_parallel_size": 4,
                                          "distributed_executor_backend": "ray"}
    # On a CPU cluster the same config runs one engine per instance, no tensor parallel.
    assert not instance_placement(config, "prefill", 0, gpu=False).needs_placement_group


def test_specs_carry_the_kv_settings_and_one_deployment_secret() -> None:
    config = ServeConfig(kv_transport="tcp", address="auto")
    specs = [spec for spec, _ in instance_specs(config, "/m", gpu=False, kv_auth_token="s3cret")]
    assert [s.instance_id for s in specs] == ["prefill-0", "decode-0"]
    assert {(s.kv_transport, s.kv_auth_token, s.kv_port) for s in specs} == {("tcp", "s3cret", 0)}
    assert specs[0].kv_host is None  # joined cluster: each instance binds its node's address


def test_kv_servers_bind_loopback_locally_and_the_node_address_on_a_cluster() -> None:
    assert kv_bind_host(ServeConfig()) == "127.0.0.1"
    assert kv_bind_host(ServeConfig(address="10.0.0.1:6379")) is None
    assert kv_bind_host(ServeConfig(address="auto", kv_host="0.0.0.0")) == "0.0.0.0"


@pytest.mark.parametrize("field, value, message", [
    ("prefill_resources", {"GPU": 1}, "not a custom resource"),
    ("decode_resources", {"pool": 0}, "must be > 0"),
    ("kv_transport", "carrier-pigeon", "auto"),
    ("gpus_per_instance", 0, "greater than or equal to 1"),
    ("engine_args", {"tensor_parallel_size": 2}, "tensor_parallel_size"),
])
def test_bad_placement_options_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServeConfig.model_validate({field: value})


def test_cli_takes_pools_as_json_and_names_a_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--decode-node-labels", "pool=decode"])
    assert exit_info.value.code == 2
    assert "--decode-node-labels" in capsys.readouterr().err
    assert main(["serve", "--prefill-resources", '{"CPU": 1}']) == 2
    assert "--prefill-resources" in capsys.readouterr().err
