"""The actors of a running cluster, as the api process holds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ClusterHandles:
    """The actors of a running cluster, by instance id. The role maps follow flips (the
    cluster monitor moves an instance when its role changes)."""

    scheduler: Any
    prefill: dict[str, Any]
    decode: dict[str, Any]
    kv_auth_token: str | None = None
    """The deployment's KV secret: the api needs it to release a lease early."""

    @property
    def instances(self) -> dict[str, Any]:
        return self.prefill | self.decode
