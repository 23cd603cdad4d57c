"""KV hand-over counters, carried from the worker to the engine's stat loggers.

Per transport (`num_transfers_tcp`, `num_bytes_shm`, ... and `_none` for pulls that failed
before a transport was chosen) with their totals, expired leases, prompt tokens a decode
recomputed because their KV did not arrive, requests refused for a wrong or missing auth
token (`num_unauthorized`), blocks staged during their prefill (`num_overlapped_blocks`,
overlap mode), and per-transfer seconds per transport (`seconds_tcp`, ...).
Flat keys, so the dict vLLM ships between processes stays plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from shuffleinfer.kv.transport import TRANSPORT_NAMES
from shuffleinfer.protocol import KVTransferStats, TransportStats

NO_TRANSPORT = "none"
_LABELS = (*TRANSPORT_NAMES, NO_TRANSPORT)
_PER_TRANSPORT = ("num_transfers", "num_failures", "num_bytes")
_COUNTERS = (*_PER_TRANSPORT, "num_expired_leases", "num_unauthorized",
             "num_recomputed_tokens", "num_overlapped_blocks",
             *(f"{key}_{name}" for name in _LABELS for key in _PER_TRANSPORT))
_SECONDS = tuple(f"seconds_{name}" for name in _LABELS)


@dataclass
class ShuffleKVStats(KVConnectorStats):
    """Transfers, failures, bytes (in total and per transport), expired leases, recomputed
    tokens, refused requests and per-transfer seconds in one interval."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {key: 0 for key in _COUNTERS} | {key: [] for key in _SECONDS}

    def record_transfer(self, nbytes: int, seconds: float, transport: str) -> None:
        """A pull finished; `transport` is the one that moved it."""
        self._count("num_transfers", transport)
        self._count("num_bytes", transport, nbytes)
        self.data[f"seconds_{transport}"].append(seconds)

    def record_failure(self, transport: str | None, recomputed_tokens: int = 0) -> None:
        """A pull failed; `transport` is the one chosen, None if none could be; the decode
        computes `recomputed_tokens` prompt tokens itself instead."""
        self._count("num_failures", transport or NO_TRANSPORT)
        self.record_recomputed(recomputed_tokens)

    def record_recomputed(self, num_tokens: int) -> None:
        self.data["num_recomputed_tokens"] += num_tokens

    def record_expired(self) -> None:
        self.data["num_expired_leases"] += 1

    def record_unauthorized(self) -> None:
        self.data["num_unauthorized"] += 1

    def record_overlapped(self, num_blocks: int) -> None:
        self.data["num_overlapped_blocks"] += num_blocks

    def _count(self, key: str, transport: str, amount: int = 1) -> None:
        self.data[key] += amount
        if f"{key}_{transport}" in self.data:
            self.data[f"{key}_{transport}"] += amount

    def aggregate(self, other: KVConnectorStats) -> ShuffleKVStats:
        for key in _COUNTERS:
            self.data[key] += int(other.data.get(key, 0))
        for key in _SECONDS:
            self.data[key] = list(self.data[key]) + list(other.data.get(key, []))
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds = [x for key in _SECONDS for x in self.data[key]]
        return {key: self.data[key] for key in _COUNTERS} | {
            "mean_seconds": sum(seconds) / len(seconds) if seconds else 0.0
        }

    def is_empty(self) -> bool:
        return not any(self.data[key] for key in _COUNTERS)

    def drain(self) -> KVTransferStats:
        """The cumulative counters as the api reads them, taking the seconds recorded
        since the last drain (each transfer's duration is reported once)."""
        transports = {}
        for name in _LABELS:
            seconds = tuple(self.data[f"seconds_{name}"])
            self.data[f"seconds_{name}"] = []
            counts = {key: int(self.data[f"{key}_{name}"]) for key in _PER_TRANSPORT}
            if any(counts.values()) or seconds:
                transports[name] = TransportStats(**counts, seconds=seconds)
        return KVTransferStats(transports, num_expired_leases=self.data["num_expired_leases"],
                               num_recomputed_tokens=self.data["num_recomputed_tokens"],
                               num_unauthorized=self.data["num_unauthorized"],
                               num_overlapped_blocks=self.data["num_overlapped_blocks"])

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ShuffleKVStats:
        stats = cls()
        if data:
            stats.aggregate(cls(data=dict(data)))
        return stats
