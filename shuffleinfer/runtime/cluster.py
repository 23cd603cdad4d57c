"""Start (or join) a Ray cluster and launch a ShuffleInfer deployment on it:
N prefill and K decode instance actors, each owning a vLLM engine, and the scheduler."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Any

import ray

from shuffleinfer.config import ServeConfig
from shuffleinfer.engine.calibration import resolved_chunk_size
from shuffleinfer.engine.instance import EngineInfo, InstanceSpec, Role
from shuffleinfer.runtime.actors import InstanceActor, SchedulerActor
from shuffleinfer.runtime.handles import ClusterHandles
from shuffleinfer.runtime.placement import (
    InstancePlacement,
    gpu_engine_args,
    instance_placement,
    ray_options,
)
from shuffleinfer.scheduler.policies.placement import PlacementConfig

logger = logging.getLogger(__name__)


def has_gpu() -> bool:
    """Whether the instances run on GPUs: the cluster offers any (the driver's own node,
    often a CPU-only head, does not decide)."""
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def init_ray(config: ServeConfig) -> None:
    """Join `config.address`, or start a local Ray big enough for every instance."""
    if ray.is_initialized():
        return
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
        return
    num_cpus = max(os.cpu_count() or 1, config.num_instances * config.cpus_per_instance)
    # "local": a new cluster of our own, even if `ray start` left one running here
    # (without it, ray.init joins any local cluster it finds).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             logging_level=logging.WARNING)


def engine_dtype(config: ServeConfig, gpu: bool) -> str:
    """Resolve `dtype: auto`: float32 on CPU, the model's own dtype (vLLM's auto) on GPU."""
    if config.dtype != "auto":
        return config.dtype
    return "auto" if gpu else "float32"


def kv_bind_host(config: ServeConfig) -> str | None:
    """Where KV servers bind: as configured; else loopback on a local Ray, and each
    node's own address (None, resolved by the instance) on a joined cluster."""
    if config.kv_host:
        return config.kv_host
    return None if config.address else "127.0.0.1"


def instance_specs(config: ServeConfig, model_path: str, gpu: bool,
                   kv_auth_token: str | None = None
                   ) -> list[tuple[InstanceSpec, InstancePlacement]]:
    """One spec per instance with where it goes; prefill instances first. Ports are
    picked by each instance on its own node when it starts."""
    roles: list[tuple[Role, int]] = [("prefill", n) for n in range(config.num_prefill)] + \
        [("decode", n) for n in range(config.num_decode)]
    chunk_size, _ = resolved_chunk_size(config)
    specs = []
    for index, (role, n) in enumerate(roles):
        placement = instance_placement(config, role, index, gpu)
        specs.append((InstanceSpec(
            instance_id=f"{role}-{n}", role=role, model=model_path,
            chunk_size=chunk_size, dtype=engine_dtype(config, gpu),
            max_model_len=config.max_model_len, kv_host=kv_bind_host(config),
            kv_lease_s=config.kv_lease_s, kv_transport=config.kv_transport,
            kv_overlap=config.kv_overlap,
            kv_auth_token=kv_auth_token,
            engine_args={**gpu_engine_args(placement), **config.engine_args},
            predictor=config.predictor, prefill_order=config.prefill_order,
            sched_window=config.sched_window, admission=config.admission,
            heavy_threshold_tokens=config.heavy_threshold_tokens), placement))
    return specs


async def launch(config: ServeConfig, model_path: str) -> tuple[ClusterHandles, list[EngineInfo]]:
    """Create the actors (each on a node its pool allows) and start every engine
    concurrently; raises if any fails."""
    gpu = has_gpu()
    actors: dict[str, Any] = {}
    # One secret per deployment: KV servers serve only pulls that carry it.
    kv_auth_token = secrets.token_hex(16)
    planned = instance_specs(config, model_path, gpu, kv_auth_token=kv_auth_token)
    specs = [spec for spec, _ in planned]
    for spec, placement in planned:
        options = await asyncio.to_thread(ray_options, placement, spec.instance_id)
        actors[spec.instance_id] = InstanceActor.options(**options).remote(spec)
    infos = list(await asyncio.gather(*(_start(i, a, config.max_restarts)
                                        for i, a in actors.items())))
    scheduler = SchedulerActor.options(num_cpus=0).remote(
        [s.instance_id for s in specs if s.role == "prefill"],
        [s.instance_id for s in specs if s.role == "decode"],
        config.prefill_policy, config.decode_policy,
        placement_config=PlacementConfig(heavy_threshold_tokens=config.heavy_threshold_tokens),
        flip_policy=config.flip_policy, flip_config=config.flip_config())
    await scheduler.start_learner.remote(  # type: ignore[attr-defined]
        config.predictor, config.predictor_state)
    handles = ClusterHandles(
        scheduler=scheduler,
        prefill={s.instance_id: actors[s.instance_id] for s in specs if s.role == "prefill"},
        decode={s.instance_id: actors[s.instance_id] for s in specs if s.role == "decode"},
        kv_auth_token=kv_auth_token)
    return handles, infos


async def _start(instance_id: str, actor: Any, max_restarts: int) -> EngineInfo:
    """Start an instance's engine; if Ray restarts the actor meanwhile (it died, e.g. the
    node ran short of memory) and restarts are allowed, start the new one."""
    retries_left = max_restarts if max_restarts >= 0 else 3
    while True:
        try:
            return await actor.start.remote()  # type: ignore[no-any-return]
        except ray.exceptions.ActorUnavailableError as e:
            if retries_left == 0:
                raise
            retries_left -= 1
            logger.warning("%s was restarted while starting (%s); starting it again",
                           instance_id, e)


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
