"""A multi-node Ray cluster on this machine, started beforehand with `ray start` (a head
and two worker nodes: one offering the custom resource `prefill_pool`, one labelled
`shuffleinfer.io/pool=decode`), joined by `shuffleinfer serve --address`: each instance
lands on the node its pool names, the KV crosses between the nodes over TCP on the nodes'
address, and requests complete."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shuffleinfer.engine.instance import free_port

pytestmark = pytest.mark.engine

RAY = str(Path(sys.executable).with_name("ray"))
STARTUP_TIMEOUT_S = 600
# `ray start --head` turns on token auth; every process joining it must use the token.
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_node(args: list[str]) -> subprocess.Popen[bytes]:
    """A Ray node in the foreground (`--block`): killing its group stops exactly it."""
    return subprocess.Popen([RAY, "start", "--block", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def _nodes(address: str) -> list[dict]:
    code = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources'], "
            "'labels': n.get('Labels', {})} for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code, address], env=ENV, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _wait_for_nodes(address: str, count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if len(_nodes(address)) >= count:
                return
        except (subprocess.SubprocessError, ValueError, IndexError):
            pass  # the head is not up yet
        if time.monotonic() > deadline:
            pytest.fail(f"the Ray cluster at {address} did not reach {count} nodes")
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """Address of a three-node Ray cluster (head without CPUs, prefill node, decode node)."""
    port = free_port("127.0.0.1")
    address = f"127.0.0.1:{port}"
    nodes = [_ray_node(["--head", f"--port={port}", "--num-cpus=0",
                        "--include-dashboard=false", "--disable-usage-stats"])]
    try:
        _wait_for_nodes(address, 1)
        # One at a time: two raylets starting at once on one machine can race for ports.
        nodes.append(_ray_node([f"--address={address}", "--num-cpus=1",
                                '--resources={"prefill_pool": 1}']))
        _wait_for_nodes(address, 2)
        nodes.append(_ray_node([f"--address={address}", "--num-cpus=1",
                                "--labels=shuffleinfer.io/pool=decode"]))
        _wait_for_nodes(address, 3)
        yield address
    finally:
        for proc in reversed(nodes):
            _stop(proc)


@pytest.fixture(scope="module")
def server(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port("127.0.0.1")
    log_path = tmp_path_factory.mktemp("multinode") / "serve.log"
    cmd = [sys.executable, "-m", "shuffleinfer", "serve", "--address", cluster,
           "--port", str(port), "--chunk-size", "256", "--max-model-len", "1024",
           "--kv-cache-gib", "1", "--kv-transport", "tcp",
           "--prefill-resources", '{"prefill_pool": 1}',
           "--decode-node-labels", '{"shuffleinfer.io/pool": "decode"}']
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield url
    finally:
        _stop(proc, signal.SIGINT)


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_instances_land_on_the_nodes_their_pools_name(cluster: str, server: str) -> None:
    nodes = _nodes(cluster)
    prefill_node = next(n["id"] for n in nodes if "prefill_pool" in n["resources"])
    decode_node = next(n["id"] for n in nodes
                       if n["labels"].get("shuffleinfer.io/pool") == "decode")
    instances = {i["instance_id"]: i for i in httpx.get(f"{server}/health").json()["instances"]}
    assert instances["prefill-0"]["node_id"] == prefill_node
    assert instances["decode-0"]["node_id"] == decode_node


def test_kv_crosses_between_nodes_and_requests_complete(server: str) -> None:
    before = httpx.get(f"{server}/metrics").text
    prompt = " ".join(["The river carried the boat past the old mill and the town."] * 40)
    reply = httpx.post(f"{server}/v1/completions", timeout=300, json={
        "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 12,
        "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["prompt_tokens"] > 256  # more than one prefill chunk
    after = httpx.get(f"{server}/metrics").text
    assert _metric(after, "shuffleinfer_kv_transfers_total") == \
        _metric(before, "shuffleinfer_kv_transfers_total") + 1
    assert _metric(after, "shuffleinfer_kv_transfer_failures_total") == \
        _metric(before, "shuffleinfer_kv_transfer_failures_total")
