"""Where each instance actor runs on a Ray cluster: its resources, node labels, GPUs and
restart policy, derived from the serve config.

- Pools: prefill and decode instances ask for the custom resources and node labels of
  their role (`prefill_resources`, `prefill_node_labels`, ...), so an operator dedicates
  node types to each pool (see deploy/ray-cluster.yaml).
- GPUs: an instance with `gpus_per_instance` > 1 runs vLLM tensor-parallel. Its GPUs are
  reserved as one STRICT_PACK placement group (one bundle per GPU, all on one node, the
  pool's resources and labels on every bundle); the actor runs in bundle 0 and vLLM's Ray
  executor places its other workers in the same group.
- CPU: each instance reserves `cpus_per_instance` cores and binds its engine to them.
- Restarts: Ray restarts a dead instance actor up to `max_restarts` times.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shuffleinfer.config import ServeConfig
from shuffleinfer.engine.instance import Role


@dataclass(frozen=True)
class InstancePlacement:
    """Ray options of one instance actor, before any placement group exists."""

    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    label_selector: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 0
    tensor_parallel_size: int = 1
    env_vars: dict[str, str] = field(default_factory=dict)

    @property
    def needs_placement_group(self) -> bool:
        """True when the instance spans several GPUs that must share a node."""
        return self.tensor_parallel_size > 1

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per GPU; the pool's custom resources and the CPUs on the first."""
        first = {"GPU": 1.0, "CPU": self.num_cpus, **self.resources}
        return [first] + [{"GPU": 1.0} for _ in range(self.tensor_parallel_size - 1)]

    def actor_options(self) -> dict[str, Any]:
        """`.options(...)` for the actor when it is not in a placement group."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                   "max_restarts": self.max_restarts}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.label_selector:
            options["label_selector"] = dict(self.label_selector)
        if self.env_vars:
            options["runtime_env"] = {"env_vars": dict(self.env_vars)}
        return options


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
DEFAULT_ONEDNN_CACHE = "0"
"""oneDNN keeps up to 1,024 compiled kernels by default, one per new shape; under mixed
traffic (every prompt length a new shape) that grew a CPU worker by ~37 MiB/min for 15
minutes. With 0 the soak's memory levels off after ~5 minutes (vLLM's own per-layer
cache of 32 shapes still serves repeats); measured capacity 0.72 vs 0.79 req/s, within
this machine's noise. Set the variable to override."""


def cpu_env(index: int, config: ServeConfig, num_cores: int | None = None) -> dict[str, str]:
    """Environment for instance `index` on a CPU node: its own cores, KV cache size, and
    a bounded oneDNN kernel cache (ONEDNN_CACHE_ENV)."""
    ncpu = num_cores or os.cpu_count() or 1
    per = min(config.cpus_per_instance, ncpu)
    first = (index * per) % ncpu
    cores = sorted({(first + k) % ncpu for k in range(per)})
    return {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores),
        "VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib),
        "OMP_NUM_THREADS": str(per),
        ONEDNN_CACHE_ENV: os.environ.get(ONEDNN_CACHE_ENV, DEFAULT_ONEDNN_CACHE),
    }


def instance_placement(config: ServeConfig, role: Role, index: int, gpu: bool,
                       num_cores: int | None = None) -> InstancePlacement:
    """The Ray options of the `index`-th instance (counting all roles), playing `role`."""
    resources = config.prefill_resources if role == "prefill" else config.decode_resources
    labels = config.prefill_node_labels if role == "prefill" else config.decode_node_labels
    tp = config.gpus_per_instance if gpu else 1
    return InstancePlacement(
        num_cpus=float(config.cpus_per_instance),
        num_gpus=float(tp) if gpu and tp == 1 else 0.0,
        resources=dict(resources), label_selector=dict(labels),
        max_restarts=config.max_restarts, tensor_parallel_size=tp,
        env_vars={} if gpu else cpu_env(index, config, num_cores))


def gpu_engine_args(placement: InstancePlacement) -> dict[str, Any]:
    """Engine args a multi-GPU instance adds: vLLM's Ray executor, which schedules its
    tensor-parallel workers in the placement group the actor runs in."""
    if not placement.needs_placement_group:
        return {}
    return {"tensor_parallel_size": placement.tensor_parallel_size,
            "distributed_executor_backend": "ray"}


def ray_options(placement: InstancePlacement, name: str) -> dict[str, Any]:
    """The actor's `.options(...)`; creates (and waits for) its placement group if it
    needs one. Raises TimeoutError if the cluster cannot hold the group."""
    options = placement.actor_options()
    if not placement.needs_placement_group:
        return options
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    selectors = [dict(placement.label_selector)] * placement.tensor_parallel_size \
        if placement.label_selector else None
    group = placement_group(placement.bundles(), strategy="STRICT_PACK", name=f"si-{name}",
                            bundle_label_selector=selectors)  # type: ignore[arg-type]
    if not group.wait(timeout_seconds=600):
        raise TimeoutError(f"placement group for {name} is not ready after 600 s: no node "
                           f"offers {placement.bundles()} with labels {placement.label_selector}")
    for key in ("num_gpus", "resources", "label_selector"):
        options.pop(key, None)
    options["num_gpus"] = 0
    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=0,
        placement_group_capture_child_tasks=True)
    return options
