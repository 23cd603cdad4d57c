"""Ray actor shells: the logic lives in plain classes that run without Ray."""

from __future__ import annotations

import ray

from shuffleinfer.engine.instance import EngineInstance
from shuffleinfer.scheduler.global_scheduler import GlobalScheduler

InstanceActor = ray.remote(EngineInstance)
SchedulerActor = ray.remote(GlobalScheduler)
