"""ShuffleInfer as a Ray Serve application: `serve run shuffleinfer.runtime.serve_app:build
key=value ...`, or a KubeRay RayService's `import_path: shuffleinfer.runtime.serve_app:build`.

The application's life cycle: `build(args)` validates the args (`ServeConfig` fields, as
in `shuffleinfer serve --config`) and binds one deployment, `ShuffleInferIngress`, one
replica without CPUs. When Serve starts the replica, `__serve_build_asgi_app__` launches
the prefill and decode instances and the scheduler on the Serve cluster's Ray (the same
`start_app` as `shuffleinfer serve`) and hands Serve the api's FastAPI app; the replica,
and so the application, is ready only once every engine has started. Serve's HTTP proxy
then forwards every request to that app, SSE streams included. When Serve stops the
replica (`serve shutdown`, a redeploy, the RayService going away), `__del__` stops every
engine; the instance actors belong to the replica, so Ray ends them with it regardless.

Serve decides where HTTP is served (its `http_options`), so `host` and `port` are unused
here. `address` does not pick a Ray to join (the replica already runs in one), but as in
`shuffleinfer serve` it makes the KV servers bind each node's own address instead of
loopback: set `address: auto` on a multi-node cluster.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from shuffleinfer.config import ServeConfig, load_config
from shuffleinfer.model import resolve_model
from shuffleinfer.runtime.backend import RayBackend
from shuffleinfer.runtime.cluster import shutdown
from shuffleinfer.runtime.handles import ClusterHandles
from shuffleinfer.serve import start_app

logger = logging.getLogger(__name__)

MAX_ONGOING_REQUESTS = 4096
"""Requests Serve lets into the replica at once. The api queues and places requests
itself; Serve's default (5) would queue everything past the fifth at the proxy."""

GRACEFUL_SHUTDOWN_TIMEOUT_S = 180
"""Time Serve gives the replica to stop: in-flight requests finish, then `__del__` stops
the engines (each up to 30 s) and the learner saves its state."""


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
@serve.ingress()
class ShuffleInferIngress:
    """The one replica: owns a ShuffleInfer cluster and serves its OpenAI-compatible api.
    One replica only: a second would launch a second set of instances."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.handles: ClusterHandles | None = None
        self.backend: RayBackend | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve once, after `__init__`: launch the cluster, return the api."""
        config = self.config
        model_path = await asyncio.to_thread(resolve_model, config.model, config.cache_dir)
        logger.info("starting %d prefill and %d decode instances of %s",
                    config.num_prefill, config.num_decode, model_path)
        app, self.handles = await start_app(config, model_path)
        self.backend = app.state.server.backend
        return app

    async def __del__(self) -> None:
        """Called by Serve when it stops the replica: stop every engine, then the app."""
        if self.backend is not None:
            self.backend.close()
        if self.handles is not None:
            await asyncio.to_thread(shutdown, self.handles)
            self.handles = None
        # Serve's ASGI wrapper, next in the MRO, runs the app's lifespan shutdown.
        await super().__del__()  # type: ignore[misc]


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` are `ServeConfig` fields; an unknown key or a bad
    value raises a pydantic.ValidationError naming it."""
    config = load_config(None, args)
    unused = sorted({"host", "port"} & set(args))
    if unused:
        logger.warning("%s: unused under Ray Serve (its http_options decide)",
                       ", ".join(unused))
    return ShuffleInferIngress.bind(config)  # type: ignore[attr-defined,no-any-return]
