"""The connector's options, read from vLLM's `kv_connector_extra_config` and validated
once, when vLLM builds the connector (an error there stops the engine from starting)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shuffleinfer.kv.selection import check_choice

DEFAULT_LEASE_S = 30.0
DEFAULT_PULL_TIMEOUT_S = 10.0
DEFAULT_STAGING_MIB = 2048


@dataclass(frozen=True)
class ConnectorOptions:
    """`kv_connector_extra_config`, one field per key."""

    port: int
    """Port of this worker's KV server (0: any free port)."""
    host: str = "127.0.0.1"
    """Address the KV server binds."""
    advertise_host: str | None = None
    """Address decode engines dial (defaults to `host`)."""
    lease_s: float = DEFAULT_LEASE_S
    """How long a prefill's blocks wait to be pulled before they are freed."""
    pull_timeout_s: float = DEFAULT_PULL_TIMEOUT_S
    """Bound on each step of a pull (connect, header, bytes) before it fails."""
    transport: str = "auto"
    """"auto" | "tcp" | "shm" | "nccl": how a decode engine pulls (`selection.py`)."""
    auth_token: str | None = None
    """Shared secret every KV request must carry; None: no check."""
    overlap: bool = False
    """Stage a prefill's blocks as its chunks complete, so the hand-over hides behind
    the prefill (`staging.py`); False: pull the whole request when it is done."""
    staging_mib: int = DEFAULT_STAGING_MIB
    """Bound on the host memory staged prefills hold (overlap mode); past it, whole."""
    shared_cache: bool = True
    """Keep a CPU engine's KV cache in shared memory, so an shm pull copies the blocks
    once, straight from the prefill's cache (`shared_cache.py`); False: twice."""

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> ConnectorOptions:
        """Parse the extra config; raises ValueError naming a bad or unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = set(extra) - known
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        if "port" not in extra:
            raise ValueError("kv_connector_extra_config needs a port")
        port = int(extra["port"])
        if not 0 <= port <= 65535:
            raise ValueError(f"KV port {port} is out of range")
        lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))
        pull_timeout_s = float(extra.get("pull_timeout_s", DEFAULT_PULL_TIMEOUT_S))
        if lease_s <= 0 or pull_timeout_s <= 0:
            raise ValueError("lease_s and pull_timeout_s must be positive")
        token = extra.get("auth_token")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("auth_token must be a non-empty string (or absent)")
        overlap = extra.get("overlap", False)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be true or false, not {overlap!r}")
        staging_mib = extra.get("staging_mib", DEFAULT_STAGING_MIB)
        if not isinstance(staging_mib, int) or isinstance(staging_mib, bool) \
                or staging_mib < 0:
            raise ValueError(f"staging_mib must be a non-negative integer, not {staging_mib!r}")
        shared_cache = extra.get("shared_cache", True)
        if not isinstance(shared_cache, bool):
            raise ValueError(f"shared_cache must be true or false, not {shared_cache!r}")
        host = str(extra.get("host", "127.0.0.1"))
        return cls(port=port, host=host,
                   advertise_host=str(extra.get("advertise_host") or host),
                   lease_s=lease_s, pull_timeout_s=pull_timeout_s,
                   transport=check_choice(str(extra.get("transport", "auto"))),
                   auth_token=token, overlap=overlap, staging_mib=staging_mib,
                   shared_cache=shared_cache)
