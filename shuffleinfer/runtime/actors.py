"""Ray actor shells: the logic lives in plain classes that run without Ray."""

from __future__ import annotations

import ray

from shuffleinfer.engine.instance import EngineInstance, InstanceSpec
from shuffleinfer.scheduler.global_scheduler import GlobalScheduler


class RayEngineInstance(EngineInstance):
    """An engine instance that knows the Ray node it landed on (reported in its load)."""

    def __init__(self, spec: InstanceSpec) -> None:
        super().__init__(spec, node_id=ray.get_runtime_context().get_node_id())


InstanceActor = ray.remote(RayEngineInstance)

SchedulerActor = ray.remote(GlobalScheduler)
