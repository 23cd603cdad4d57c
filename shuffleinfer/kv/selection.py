"""Which transport a (prefill, decode) pair uses: decided by the decode side at pull time.

| configured | same host              | different hosts        |
| ---------- | ---------------------- | ---------------------- |
| auto       | nccl if both GPU, else shm | nccl if both GPU, else tcp |
| tcp        | tcp                    | tcp                    |
| shm        | shm                    | error                  |
| nccl       | nccl if both GPU, else error | same             |

An error is raised as KVTransferError, so it takes the pull's failure path (the decode
recomputes, the failure is logged and counted): a forced transport never hangs a pull.

Why auto takes shm on one host: with its segment reused across pulls (`shm_segments`),
shm handed 259 MiB over faster than loopback tcp in each of 7 runs of the transport
benchmark (9 rounds; now `python -m benchmarks kv`) on a 2-core CPU machine busy with
other work:
median pull 219 ms against 387 ms, shm/tcp 1.2x-2.2x (median 1.9x). While each pull made
a fresh segment, shm was 0.6x-0.8x tcp: the kernel zeroing and freeing the pages cost
more than the copies.

"Same host" means: the two processes can open each other's /dev/shm segments. The prefill
side advertises `host_identity()` in its kv_transfer_params; two Ray nodes on one machine
give the same identity, two machines (or containers with private /dev/shm) do not.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

from shuffleinfer.kv.transport import (
    TRANSPORT_CHOICES,
    TRANSPORT_NAMES,
    KVTransferError,
    TransportName,
)


@dataclass(frozen=True)
class Endpoint:
    """What the choice needs to know about one side of a pair."""

    host_id: str | None
    """`host_identity()` of the side's process; None when unknown (never the same host)."""
    kv_device: str
    """Device type of the side's KV cache: "cpu", "cuda", ..."""


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


@functools.cache
def host_identity() -> str | None:
    """This process's host, as far as shared memory goes: hostname, the kernel's boot id
    (machine id as a fallback) and the device number of /dev/shm's file system, which
    tells apart containers that share a kernel but not /dev/shm. None if unknowable."""
    boot = (_read_first_line("/proc/sys/kernel/random/boot_id")
            or _read_first_line("/etc/machine-id"))
    if boot is None:
        return None
    try:
        shm_dev = os.stat("/dev/shm").st_dev
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{shm_dev}"


def check_choice(configured: str) -> str:
    """Validate the `transport` key of `kv_connector_extra_config`; returns it."""
    if configured not in TRANSPORT_CHOICES:
        raise ValueError(f"unknown KV transport {configured!r}; known: "
                         f"{', '.join(TRANSPORT_CHOICES)}")
    return configured


def choose_transport(configured: str, local: Endpoint, remote: Endpoint) -> TransportName:
    """The transport for pulling from `remote` into `local` (see the module's table).

    Raises KVTransferError when a forced transport cannot work for this pair, and
    ValueError for an unknown configured name."""
    check_choice(configured)
    same_host = local.host_id is not None and local.host_id == remote.host_id
    both_gpu = local.kv_device == "cuda" and remote.kv_device == "cuda"
    if configured == "auto":
        if both_gpu:
            return "nccl"
        return "shm" if same_host else "tcp"
    if configured == "shm" and not same_host:
        raise KVTransferError(f"transport shm forced, but the prefill is on another host "
                              f"({remote.host_id} vs {local.host_id} here)")
    if configured == "nccl" and not both_gpu:
        raise KVTransferError(f"transport nccl forced, but the KV caches are on "
                              f"{remote.kv_device} (prefill) and {local.kv_device} (decode)")
    return _FORCED[configured]


_FORCED: dict[str, TransportName] = {name: name for name in TRANSPORT_NAMES}
