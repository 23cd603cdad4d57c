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

from tests.serve_process import STARTUP_TIMEOUT_S, free_port, running_serve, stop_group

pytestmark = pytest.mark.engine

RAY = str(Path(sys.executable).with_name("ray"))
# `ray start --head` turns on token auth; every process joining it must use the token.
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_node(args: list[str]) -> subprocess.Popen[bytes]:
    """A Ray node in the foreground (`--block`): killing its group stops exactly it."""
    return subprocess.Popen([RAY, "start", "--block", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


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
    port = free_port()
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
            stop_group(proc)


@pytest.fixture(scope="module")
def server(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Eager engines (no torch.compile) start about a minute sooner each on 2 cores; the
    # compiled path is what tests/integration serves.
    args = ["--address", cluster, "--chunk-size", "256", "--max-model-len", "1024",
            "--kv-cache-gib", "1", "--kv-transport", "tcp", "--max-restarts", "1",
            "--prefill-resources", '{"prefill_pool": 1}',
            "--decode-node-labels", '{"shuffleinfer.io/pool": "decode"}',
            "--engine-arg", "enforce_eager=true"]
    log_path = tmp_path_factory.mktemp("multinode") / "serve.log"
    with running_serve(args, log_path, env=ENV) as url:
        yield url


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


def _complete(server: str) -> dict:
    prompt = " ".join(["The river carried the boat past the old mill and the town."] * 40)
    reply = httpx.post(f"{server}/v1/completions", timeout=300, json={
        "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 12,
        "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_kv_crosses_between_nodes_and_requests_complete(server: str) -> None:
    before = httpx.get(f"{server}/metrics").text
    body = _complete(server)
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["prompt_tokens"] > 256  # more than one prefill chunk
    after = httpx.get(f"{server}/metrics").text
    assert _metric(after, "shuffleinfer_kv_transfers_total") == \
        _metric(before, "shuffleinfer_kv_transfers_total") + 1
    assert _metric(after, "shuffleinfer_kv_transfer_failures_total") == \
        _metric(before, "shuffleinfer_kv_transfer_failures_total")


def test_a_killed_instance_is_restarted_by_ray_and_rejoins(server: str) -> None:
    def decode_instance() -> dict:
        instances = httpx.get(f"{server}/health", timeout=30).json()["instances"]
        return next(i for i in instances if i["instance_id"] == "decode-0")

    old = decode_instance()
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        now = decode_instance()
        if now["ready"] and now["pid"] != old["pid"]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"decode-0 did not come back: {now}")
        time.sleep(2)
    assert now["node_id"] == old["node_id"]  # back on its pool's node
    assert httpx.get(f"{server}/health").status_code == 200
    assert _complete(server)["usage"]["completion_tokens"] == 12
