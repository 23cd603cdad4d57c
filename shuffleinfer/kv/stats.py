"""KV hand-over counters, carried from the worker to the engine's stat loggers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_COUNTERS = ("num_transfers", "num_failures", "num_bytes", "num_expired_leases")


@dataclass
class ShuffleKVStats(KVConnectorStats):
    """Transfers, failures, bytes, expired leases and per-transfer seconds in one interval."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {key: 0 for key in _COUNTERS} | {"seconds": []}

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        self.data["num_transfers"] += 1
        self.data["num_bytes"] += nbytes
        self.data["seconds"].append(seconds)

    def record_failure(self) -> None:
        self.data["num_failures"] += 1

    def record_expired(self) -> None:
        self.data["num_expired_leases"] += 1

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
