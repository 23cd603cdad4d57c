"""`shuffleinfer serve`: prepare the model, launch the cluster, run the HTTP server."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from shuffleinfer.config import ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

    from shuffleinfer.runtime.handles import ClusterHandles

logger = logging.getLogger("shuffleinfer.serve")

ADMIN_TOKEN_ENV = "SHUFFLEINFER_ADMIN_TOKEN"
"""Where the admin token comes from when the config has none."""


def build_app(config: ServeConfig) -> tuple[object, object]:
    """Start everything but the HTTP server; returns (FastAPI app, cluster handles)."""
    import ray

    from shuffleinfer.model import resolve_model
    from shuffleinfer.runtime.cluster import init_ray

    model_path = resolve_model(config.model, config.cache_dir)
    init_ray(config)
    print(f"shuffleinfer: starting {config.num_prefill} prefill and {config.num_decode} "
          f"decode instances of {model_path} on Ray "
          f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs)", file=sys.stderr, flush=True)
    return asyncio.run(start_app(config, model_path))


async def start_app(config: ServeConfig, model_path: str) -> tuple[FastAPI, ClusterHandles]:
    """Launch the cluster on the Ray this process has joined and build the api over it;
    shared by `shuffleinfer serve` and the Ray Serve app (`runtime/serve_app.py`)."""
    from transformers import AutoTokenizer

    from shuffleinfer.api import create_app
    from shuffleinfer.engine.calibration import resolved_chunk_size
    from shuffleinfer.runtime.backend import RayBackend
    from shuffleinfer.runtime.cluster import launch

    chunk_size, source = resolved_chunk_size(config)
    print(f"shuffleinfer: chunk size {chunk_size} ({source})", file=sys.stderr, flush=True)
    # A resolved copy, so every instance (and the cluster code reading config.chunk_size)
    # runs the same value; the user's config itself is left as given.
    config = config.model_copy(update={"chunk_size": chunk_size})
    handles, infos = await launch(config, model_path)
    name = config.served_model_name or config.model
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, model_path)
    backend = RayBackend(handles, model_name=name,
                         max_model_len=min(i.max_model_len for i in infos),
                         tokenizer=tokenizer, predictor_push_s=config.predictor_push_s,
                         monitor_interval_s=config.monitor_interval_ms / 1000)
    app = create_app(backend, served_model_name=name, api_key=config.api_key,
                     admin_token=admin_token(config), max_num_requests=config.max_num_requests,
                     retry_after_s=config.retry_after_s)
    return app, handles


def admin_token(config: ServeConfig) -> str | None:
    """The /admin routes' token: the config's, else $SHUFFLEINFER_ADMIN_TOKEN, else None
    (admin routes disabled). Read where the app is built, so under Ray Serve it is the
    replica's environment that counts."""
    return config.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None


def serve(config: ServeConfig) -> int:
    """Run until interrupted; every engine is stopped on the way out."""
    import uvicorn

    from shuffleinfer.runtime.cluster import shutdown

    app, handles = build_app(config)
    print(f"shuffleinfer: ready on http://{config.host}:{config.port} "
          f"(model {config.served_model_name or config.model})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")  # type: ignore[arg-type]
    finally:
        shutdown(handles)  # type: ignore[arg-type]
    return 0
