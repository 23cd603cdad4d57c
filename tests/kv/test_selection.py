"""Which transport a pair uses: the table, forced transports that cannot work, and the
host identity that decides "same host"."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shuffleinfer.kv.selection import Endpoint, check_choice, choose_transport, host_identity
from shuffleinfer.kv.transport import KVTransferError

HOST_A, HOST_B = "box-a/boot-1/40", "box-b/boot-2/40"

# configured, (decode host, device), (prefill host, device), expected ("!" + text: error)
TABLE = [
    ("auto", (HOST_A, "cpu"), (HOST_A, "cpu"), "shm"),
    ("auto", (HOST_A, "cpu"), (HOST_B, "cpu"), "tcp"),
    ("auto", (HOST_A, "cuda"), (HOST_A, "cuda"), "nccl"),
    ("auto", (HOST_A, "cuda"), (HOST_B, "cuda"), "nccl"),
    ("auto", (HOST_A, "cuda"), (HOST_A, "cpu"), "shm"),
    ("auto", (HOST_A, "cpu"), (HOST_B, "cuda"), "tcp"),
    ("auto", (HOST_A, "cpu"), (None, "cpu"), "tcp"),  # prefill did not say where it is
    ("auto", (None, "cpu"), (None, "cpu"), "tcp"),  # unknown is never the same host
    ("tcp", (HOST_A, "cpu"), (HOST_A, "cpu"), "tcp"),
    ("tcp", (HOST_A, "cuda"), (HOST_B, "cuda"), "tcp"),
    ("shm", (HOST_A, "cpu"), (HOST_A, "cpu"), "shm"),
    ("shm", (HOST_A, "cuda"), (HOST_A, "cuda"), "shm"),
    ("shm", (HOST_A, "cpu"), (HOST_B, "cpu"), "!another host"),
    ("shm", (HOST_A, "cpu"), (None, "cpu"), "!another host"),
    ("nccl", (HOST_A, "cuda"), (HOST_B, "cuda"), "nccl"),
    ("nccl", (HOST_A, "cuda"), (HOST_A, "cuda"), "nccl"),
    ("nccl", (HOST_A, "cpu"), (HOST_A, "cpu"), "!on cpu \\(prefill\\) and cpu"),
    ("nccl", (HOST_A, "cuda"), (HOST_B, "cpu"), "!on cpu \\(prefill\\) and cuda"),
]


@pytest.mark.parametrize(("configured", "local", "remote", "expected"), TABLE)
def test_choose_transport(configured: str, local: tuple[str | None, str],
                          remote: tuple[str | None, str], expected: str) -> None:
    decode, prefill = Endpoint(*local), Endpoint(*remote)
    if expected.startswith("!"):
        with pytest.raises(KVTransferError, match=f"{configured} forced.*{expected[1:]}"):
            choose_transport(configured, decode, prefill)
    else:
        assert choose_transport(configured, decode, prefill) == expected


def test_unknown_transport_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown KV transport 'rdma'; known: auto, tcp, shm"):
        check_choice("rdma")
    with pytest.raises(ValueError, match="unknown KV transport"):
        choose_transport("SHM", Endpoint(HOST_A, "cpu"), Endpoint(HOST_A, "cpu"))


def test_host_identity_is_the_same_in_another_process_on_this_machine() -> None:
    here = host_identity()
    assert here is not None
    code = "from shuffleinfer.kv.selection import host_identity; print(host_identity())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert there == here


@pytest.mark.timeout(120)
def test_two_ray_nodes_on_one_machine_are_the_same_host() -> None:
    # Ray "nodes" of ray.cluster_utils.Cluster are process groups on this machine, as in
    # development and CI; actors land on the node holding their resource.
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=1, resources={"prefill_pool": 1})
        cluster.add_node(num_cpus=1, resources={"decode_pool": 1})
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)

        @ray.remote(num_cpus=0)
        def identity() -> tuple[str, str | None]:
            from shuffleinfer.kv.selection import host_identity

            return ray.get_runtime_context().get_node_id(), host_identity()

        prefill = identity.options(resources={"prefill_pool": 1}).remote()
        decode = identity.options(resources={"decode_pool": 1}).remote()
        (prefill_node, prefill_id), (decode_node, decode_id) = ray.get([prefill, decode])
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert prefill_node != decode_node
    assert prefill_id == decode_id == host_identity()
