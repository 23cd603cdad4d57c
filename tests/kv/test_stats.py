"""KV counters per transport survive the trip through vLLM's stats plumbing (a plain dict
from worker to logger, aggregated across steps) and reach the api as `KVTransferStats`."""

from __future__ import annotations

from shuffleinfer.kv.stats import ShuffleKVStats
from shuffleinfer.protocol import TransportStats


def test_counts_and_bytes_per_transport_add_up_across_intervals() -> None:
    a, b = ShuffleKVStats(), ShuffleKVStats()
    a.record_transfer(1000, 0.01, "shm")
    a.record_failure("tcp", recomputed_tokens=128)
    b.record_transfer(500, 0.03, "tcp")
    b.record_failure(None, recomputed_tokens=40)  # no transport could be chosen
    b.record_unauthorized()
    b.record_expired()

    total = ShuffleKVStats.from_dict(a.to_dict()).aggregate(ShuffleKVStats.from_dict(b.data))
    reduced = total.reduce()
    assert reduced["num_transfers"] == 2 and reduced["num_bytes"] == 1500
    assert reduced["num_transfers_shm"] == 1 and reduced["num_bytes_shm"] == 1000
    assert reduced["num_transfers_tcp"] == 1 and reduced["num_bytes_tcp"] == 500
    assert reduced["num_failures"] == 2 and reduced["num_failures_tcp"] == 1
    assert reduced["num_failures_none"] == 1 and reduced["num_recomputed_tokens"] == 168
    assert reduced["num_unauthorized"] == 1 and reduced["num_expired_leases"] == 1
    assert abs(reduced["mean_seconds"] - 0.02) < 1e-12

    drained = total.drain()
    assert drained.transports == {
        "shm": TransportStats(num_transfers=1, num_bytes=1000, seconds=(0.01,)),
        "tcp": TransportStats(num_transfers=1, num_failures=1, num_bytes=500,
                              seconds=(0.03,)),
        "none": TransportStats(num_failures=1)}
    assert (drained.num_transfers, drained.num_failures, drained.num_bytes) == (2, 2, 1500)
    assert drained.num_recomputed_tokens == 168 and drained.num_expired_leases == 1
    again = total.drain()  # counters stay cumulative; each duration is reported once
    assert again.transports["shm"] == TransportStats(num_transfers=1, num_bytes=1000)


def test_instances_add_up_per_transport() -> None:
    one, two = ShuffleKVStats(), ShuffleKVStats()
    one.record_transfer(10, 0.1, "shm")
    two.record_transfer(30, 0.2, "shm")
    two.record_transfer(5, 0.3, "tcp")
    two.record_expired()
    total = one.drain() + two.drain()
    assert total.transports["shm"] == TransportStats(num_transfers=2, num_bytes=40,
                                                     seconds=(0.1, 0.2))
    assert total.num_bytes == 45 and total.num_expired_leases == 1


def test_counters_from_an_older_worker_still_aggregate() -> None:
    old = {"num_transfers": 3, "num_failures": 0, "num_bytes": 30, "num_expired_leases": 1,
           "seconds": [0.1]}
    stats = ShuffleKVStats.from_dict(old)
    assert stats.data["num_transfers"] == 3 and stats.data["num_transfers_tcp"] == 0
    assert not stats.is_empty()
    assert ShuffleKVStats().is_empty()
