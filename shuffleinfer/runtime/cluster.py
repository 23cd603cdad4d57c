"""Start (or join) a Ray cluster and launch a ShuffleInfer deployment on it:
N prefill and K decode instance actors, each owning a vLLM engine, and the scheduler."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import ray

from shuffleinfer.config import ServeConfig
from shuffleinfer.engine.instance import EngineInfo, InstanceSpec
from shuffleinfer.runtime.actors import InstanceActor, SchedulerActor
from shuffleinfer.runtime.backend import ClusterHandles

logger = logging.getLogger(__name__)


def free_port(host: str) -> int:
    """A port the OS considers free on `host` now (the engine binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def cpu_env(index: int, config: ServeConfig) -> dict[str, str]:
    """Environment for instance `index` on a CPU node: its own cores and KV cache size."""
    ncpu = os.cpu_count() or 1
    per = min(config.cpus_per_instance, ncpu)
    first = (index * per) % ncpu
    cores = sorted({(first + k) % ncpu for k in range(per)})
    return {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores),
        "VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib),
        "OMP_NUM_THREADS": str(per),
    }


def init_ray(config: ServeConfig) -> None:
    """Join `config.address`, or start a local Ray big enough for every instance."""
    if ray.is_initialized():
        return
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
        return
    num_cpus = max(os.cpu_count() or 1, config.num_instances * config.cpus_per_instance)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def engine_dtype(config: ServeConfig, gpu: bool) -> str:
    """Resolve `dtype: auto`: float32 on CPU, the model's own dtype (vLLM's auto) on GPU."""
    if config.dtype != "auto":
        return config.dtype
    return "auto" if gpu else "float32"


def instance_specs(config: ServeConfig, model_path: str, gpu: bool) -> list[InstanceSpec]:
    """One spec per instance; prefill instances first."""
    roles = [("prefill", n) for n in range(config.num_prefill)] + \
        [("decode", n) for n in range(config.num_decode)]
    specs = []
    for role, n in roles:
        specs.append(InstanceSpec(
            instance_id=f"{role}-{n}", role=role, model=model_path,  # type: ignore[arg-type]
            chunk_size=config.chunk_size, dtype=engine_dtype(config, gpu),
            max_model_len=config.max_model_len, kv_host=config.kv_host,
            kv_port=free_port(config.kv_host), kv_lease_s=config.kv_lease_s,
            engine_args=dict(config.engine_args), predictor=config.predictor))
    return specs


async def launch(config: ServeConfig, model_path: str) -> tuple[ClusterHandles, list[EngineInfo]]:
    """Create the actors and start every engine concurrently; raises if any fails."""
    gpu = has_gpu()
    actors: dict[str, Any] = {}
    specs = instance_specs(config, model_path, gpu)
    for index, spec in enumerate(specs):
        options: dict[str, Any] = {"num_cpus": config.cpus_per_instance}
        if gpu:
            options["num_gpus"] = 1
        else:
            options["runtime_env"] = {"env_vars": cpu_env(index, config)}
        actors[spec.instance_id] = InstanceActor.options(**options).remote(spec)
    infos: list[EngineInfo] = await asyncio.gather(*(a.start.remote() for a in actors.values()))
    scheduler = SchedulerActor.options(num_cpus=0).remote(
        [s.instance_id for s in specs if s.role == "prefill"],
        [s.instance_id for s in specs if s.role == "decode"],
        config.prefill_policy, config.decode_policy)
    await scheduler.start_learner.remote(  # type: ignore[attr-defined]
        config.predictor, config.predictor_state)
    handles = ClusterHandles(
        scheduler=scheduler,
        prefill={s.instance_id: actors[s.instance_id] for s in specs if s.role == "prefill"},
        decode={s.instance_id: actors[s.instance_id] for s in specs if s.role == "decode"})
    return handles, infos


def shutdown(handles: ClusterHandles) -> None:
    """Stop every engine and actor of a deployment; the learner saves what it learned."""
    try:
        ray.get(handles.scheduler.save_predictor.remote(), timeout=30)
    except Exception as e:  # noqa: BLE001 - best effort on the way out
        logger.warning("predictor save: %s", e)
    for actor in handles.instances.values():
        try:
            ray.get(actor.shutdown.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            logger.warning("instance shutdown: %s", e)
        ray.kill(actor)
    ray.kill(handles.scheduler)
