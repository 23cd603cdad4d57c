"""KV counters per transport survive the trip through vLLM's stats plumbing (a plain dict
from worker to logger, aggregated across steps)."""

from __future__ import annotations

from shuffleinfer.kv.stats import ShuffleKVStats


def test_counts_and_bytes_per_transport_add_up_across_intervals() -> None:
    a, b = ShuffleKVStats(), ShuffleKVStats()
    a.record_transfer(1000, 0.01, "shm")
    a.record_failure("tcp")
    b.record_transfer(500, 0.03, "tcp")
    b.record_failure(None)  # no transport could be chosen
    b.record_unauthorized()

    total = ShuffleKVStats.from_dict(a.to_dict()).aggregate(ShuffleKVStats.from_dict(b.data))
    reduced = total.reduce()
    assert reduced["num_transfers"] == 2 and reduced["num_bytes"] == 1500
    assert reduced["num_transfers_shm"] == 1 and reduced["num_bytes_shm"] == 1000
    assert reduced["num_transfers_tcp"] == 1 and reduced["num_bytes_tcp"] == 500
    assert reduced["num_failures"] == 2 and reduced["num_failures_tcp"] == 1
    assert reduced["num_unauthorized"] == 1
    assert abs(reduced["mean_seconds"] - 0.02) < 1e-12


def test_counters_from_an_older_worker_still_aggregate() -> None:
    old = {"num_transfers": 3, "num_failures": 0, "num_bytes": 30, "num_expired_leases": 1,
           "seconds": [0.1]}
    stats = ShuffleKVStats.from_dict(old)
    assert stats.data["num_transfers"] == 3 and stats.data["num_transfers_tcp"] == 0
    assert not stats.is_empty()
    assert ShuffleKVStats().is_empty()
