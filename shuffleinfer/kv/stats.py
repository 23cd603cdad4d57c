"""KV hand-over counters, carried from the worker to the engine's stat loggers.

Totals (`num_transfers`, `num_failures`, `num_bytes`) plus the same per transport
(`num_transfers_tcp`, `num_bytes_shm`, ...), expired leases, requests refused for a wrong
or missing auth token (`num_unauthorized`), and per-transfer seconds. Flat keys, so the
dict vLLM ships between processes stays plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from shuffleinfer.kv.transport import TRANSPORT_NAMES

_PER_TRANSPORT = ("num_transfers", "num_failures", "num_bytes")
_COUNTERS = (*_PER_TRANSPORT, "num_expired_leases", "num_unauthorized",
             *(f"{key}_{name}" for name in TRANSPORT_NAMES for key in _PER_TRANSPORT))


@dataclass
class ShuffleKVStats(KVConnectorStats):
    """Transfers, failures, bytes (in total and per transport), expired leases, refused
    requests and per-transfer seconds in one interval."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {key: 0 for key in _COUNTERS} | {"seconds": []}

    def record_transfer(self, nbytes: int, seconds: float, transport: str | None = None
                        ) -> None:
        """A pull finished; `transport` is the one that moved it."""
        self._count("num_transfers", transport)
        self._count("num_bytes", transport, nbytes)
        self.data["seconds"].append(seconds)

    def record_failure(self, transport: str | None = None) -> None:
        """A pull failed; `transport` is the one chosen, None if none could be."""
        self._count("num_failures", transport)

    def record_expired(self) -> None:
        self.data["num_expired_leases"] += 1

    def record_unauthorized(self) -> None:
        self.data["num_unauthorized"] += 1

    def _count(self, key: str, transport: str | None, amount: int = 1) -> None:
        self.data[key] += amount
        if transport is not None and f"{key}_{transport}" in self.data:
            self.data[f"{key}_{transport}"] += amount

    def aggregate(self, other: KVConnectorStats) -> ShuffleKVStats:
        for key in _COUNTERS:
            self.data[key] += int(other.data.get(key, 0))
        self.data["seconds"] = list(self.data["seconds"]) + list(other.data.get("seconds", []))
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds = self.data["seconds"]
        return {key: self.data[key] for key in _COUNTERS} | {
            "mean_seconds": sum(seconds) / len(seconds) if seconds else 0.0
        }

    def is_empty(self) -> bool:
        return not any(self.data[key] for key in _COUNTERS)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ShuffleKVStats:
        stats = cls()
        if data:
            stats.aggregate(cls(data=dict(data)))
        return stats
