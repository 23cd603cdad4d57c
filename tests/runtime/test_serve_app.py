"""The Ray Serve application (`shuffleinfer.runtime.serve_app:build`) on a local Ray: a
driver in its own process group starts Serve on a free port and deploys the app with one
prefill and one decode instance; the api answers through Serve's HTTP proxy, JSON and SSE;
on SIGINT the driver shuts Serve down (the replica stops its engines) and Ray, and no
process it started is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from shuffleinfer.config import DEFAULT_MODEL_NAME
from tests.serve_process import STARTUP_TIMEOUT_S, free_port, stop_group

pytestmark = pytest.mark.engine

# Eager engines (no torch.compile) start about a minute sooner on 2 cores.
ARGS = {"chunk_size": 256, "max_model_len": 1024, "kv_cache_gib": 1,
        "num_prefill": 1, "num_decode": 1, "engine_args": {"enforce_eager": True}}

DRIVER = """
import json, signal, sys, threading
import ray
from ray import serve
from shuffleinfer.runtime.serve_app import build

stop = threading.Event()
signal.signal(signal.SIGINT, lambda *_: stop.set())
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
serve.run(build(json.loads(sys.argv[2])), name="shuffleinfer", route_prefix="/")
print("driver: deployed", flush=True)
stop.wait()
serve.shutdown()
print("driver: serve shut down", flush=True)
ray.shutdown()
"""


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_app") / "driver.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(port), json.dumps(ARGS)],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log_path)
        # Ray's workers (Serve's actors, the instances, their engines) run in sessions of
        # their own, but all descend from the driver: its Ray node, raylet, workers.
        started = psutil.Process(proc.pid).children(recursive=True)
        yield url, log_path
        os.killpg(proc.pid, signal.SIGINT)  # the driver's own shutdown path
        proc.wait(timeout=300)
        assert proc.returncode == 0, log_path.read_text()[-4000:]
        log = log_path.read_text()
        assert "driver: serve shut down" in log
        # No engine was taken for a crashed one and started again while stopping.
        assert "starting its engine again" not in log
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left running: {alive}"
    finally:
        stop_group(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"driver exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"not healthy in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(2)


def test_chat_completions_through_serve_proxy(serve_url: tuple[str, Path]) -> None:
    url, _ = serve_url
    body = {"model": DEFAULT_MODEL_NAME, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Name a primary colour."}]}
    with httpx.Client(base_url=url, timeout=120) as client:
        plain = client.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200, plain.text
        text = plain.json()["choices"][0]["message"]["content"]
        assert text.strip()

        chunks: list[str] = []
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in r.iter_lines()
                      if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            for choice in json.loads(event)["choices"]:
                chunks.append(choice["delta"].get("content") or "")
        assert len([c for c in chunks if c]) > 1  # streamed, not one block
        assert "".join(chunks) == text  # greedy: the same answer either way
