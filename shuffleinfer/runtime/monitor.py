"""The cluster monitor: every `monitor_interval_ms`, every instance's load goes to the
scheduler, and finished flips go back to the instances.

It runs in the api process beside the backend. One tick: ask every instance for its
`load()` (an instance that does not answer within the timeout is reported not ready),
hand the loads to the scheduler actor's `on_monitor` (placement reads them; drained flips
finish; the flip policy may start one), then tell each flipped instance its new role and
move it between the handles' role maps. A failed tick is logged and the next one runs on
time: the monitor only makes placement better informed, requests never wait for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import ray
from ray.exceptions import RayActorError

from shuffleinfer.protocol import InstanceLoad
from shuffleinfer.runtime.handles import ClusterHandles

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 5.0


async def gather_loads(handles: ClusterHandles, timeout_s: float = LOAD_TIMEOUT_S
                       ) -> list[InstanceLoad]:
    """Every instance's load; one that is dead or slower than `timeout_s` is not ready."""

    async def load(instance_id: str, actor: Any) -> InstanceLoad:
        try:
            return await asyncio.wait_for(actor.load.remote(), timeout_s)
        except (RayActorError, TimeoutError):
            role = "prefill" if instance_id in handles.prefill else "decode"
            return InstanceLoad(instance_id, role, ready=False)  # type: ignore[arg-type]

    return list(await asyncio.gather(*(load(i, a) for i, a in handles.instances.items())))


async def with_roles(handles: ClusterHandles, loads: list[InstanceLoad]
                     ) -> tuple[InstanceLoad, ...]:
    """`loads` with the role and state the scheduler holds (the instances' own reports
    lag a flip by at most one tick)."""
    roles = await handles.scheduler.roles.remote()
    return tuple(dataclasses.replace(x, role=roles[x.instance_id][0],
                                     state=roles[x.instance_id][1])
                 if x.instance_id in roles else x for x in loads)


class ClusterMonitor:
    """Feeds the scheduler with loads at a fixed interval."""

    def __init__(self, handles: ClusterHandles, interval_s: float) -> None:
        self.handles = handles
        self.interval_s = interval_s
        self.num_ticks = 0
        self.num_failed_ticks = 0
        self._lock = asyncio.Lock()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.tick()
            await asyncio.sleep(max(self.interval_s - (loop.time() - started), 0.0))

    async def tick(self) -> None:
        """One round (also called at once after an admin flip)."""
        async with self._lock:
            try:
                loads = await gather_loads(self.handles, max(self.interval_s, 1.0))
                changes = await self.handles.scheduler.on_monitor.remote(loads)
                for change in changes:
                    await self._apply(change.instance_id, change.role)
                self.num_ticks += 1
            except (RayActorError, ray.exceptions.RayTaskError) as e:
                self.num_failed_ticks += 1
                logger.warning("cluster monitor tick failed: %s", e)

    async def _apply(self, instance_id: str, role: str) -> None:
        handles = self.handles
        actor = handles.instances[instance_id]
        handles.prefill.pop(instance_id, None)
        handles.decode.pop(instance_id, None)
        (handles.prefill if role == "prefill" else handles.decode)[instance_id] = actor
        await actor.set_role.remote(role)
