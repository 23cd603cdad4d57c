"""Hotspots: a seeded stream of 1,000 decodes, a mix of heavy (long output) and light ones,
placed over decode instances that each generate a few tokens per request per arrival and
free a request's KV when it ends. `shuffle` must keep heavy decodes spread evenly where
`random`, on the same stream, makes hotspots."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from shuffleinfer.scheduler.policies.placement import (
    InstanceView,
    PlacementConfig,
    PlacementRequest,
    is_heavy,
    make_placement_policy,
)
from shuffleinfer.scheduler.prediction import Prediction
from shuffleinfer.scheduler.predictors import bucketed

NUM_INSTANCES = 8
NUM_REQUESTS = 1000
KV_CAPACITY_TOKENS = 3000
TOKENS_PER_ARRIVAL = 8  # decode progress of every running request between two arrivals
WARM_UP = 100  # arrivals before the cluster reaches its steady state


@dataclass
class Decoding:
    num_prompt_tokens: int
    num_output_tokens: int
    num_true_output_tokens: int
    prediction: Prediction


def stream(seed: int) -> list[tuple[int, int, Prediction]]:
    """(prompt tokens, true output tokens, prediction); 40 % heavy (200-600 tokens out)."""
    rng = random.Random(seed)
    out = []
    for _ in range(NUM_REQUESTS):
        true = rng.randint(200, 600) if rng.random() < 0.4 else rng.randint(10, 100)
        out.append((rng.randint(50, 500), true, bucketed(true, 1024, 200)))
    return out


def view(iid: str, reqs: list[Decoding], config: PlacementConfig,
         kv_capacity: int = KV_CAPACITY_TOKENS) -> InstanceView:
    heavy = sum(is_heavy(r.prediction, config) for r in reqs)
    used = sum(r.num_prompt_tokens + r.num_output_tokens for r in reqs)
    remaining = sum(max(r.prediction.point - r.num_output_tokens, 0) for r in reqs)
    return InstanceView(iid, len(reqs), 0, kv_capacity - used, heavy,
                        len(reqs) - heavy, remaining)


def heavy_per_arrival(policy: str, seed: int, num_instances: int = NUM_INSTANCES,
                      tokens_per_arrival: int = TOKENS_PER_ARRIVAL,
                      kv_capacity: int = KV_CAPACITY_TOKENS) -> list[list[int]]:
    """After each arrival (past the warm-up): the heavy decodes on every instance."""
    config = PlacementConfig()
    chooser = make_placement_policy(policy, config, random.Random(seed))
    cluster: dict[str, list[Decoding]] = {f"d{i}": [] for i in range(num_instances)}
    counts: list[list[int]] = []
    for n, (prompt, true, prediction) in enumerate(stream(seed)):
        views = [view(iid, reqs, config, kv_capacity) for iid, reqs in cluster.items()]
        decision = chooser.place(PlacementRequest(str(n), prompt, prediction), views)
        cluster[decision.instance_id].append(Decoding(prompt, 1, true, prediction))
        for iid, reqs in cluster.items():
            for r in reqs:
                r.num_output_tokens += tokens_per_arrival
            cluster[iid] = [r for r in reqs if r.num_output_tokens < r.num_true_output_tokens]
        if n >= WARM_UP:
            counts.append([sum(is_heavy(r.prediction, config) for r in reqs)
                           for reqs in cluster.values()])
    return counts


def max_heavy_per_arrival(policy: str, seed: int) -> list[int]:
    """After each arrival: the most heavy decodes on one instance."""
    return [max(c) for c in heavy_per_arrival(policy, seed)]


def busiest_over_idlest(policy: str, seed: int) -> float:
    """Over 4 instances, twice the concurrency of the stream above (4 tokens per request
    per arrival, so about 5 heavy decodes per instance, and twice the KV): the mean number
    of heavy decodes on the busiest instance over that on the idlest, after each arrival."""
    counts = heavy_per_arrival(policy, seed, num_instances=4, tokens_per_arrival=4,
                               kv_capacity=2 * KV_CAPACITY_TOKENS)
    return statistics.mean(max(c) for c in counts) / statistics.mean(min(c) for c in counts)


def test_shuffle_keeps_heavy_decodes_off_any_single_instance() -> None:
    shuffle, rand = max_heavy_per_arrival("shuffle", 0), max_heavy_per_arrival("random", 0)
    # On average the heaviest instance carries a fifth fewer heavy decodes (measured 0.78;
    # 0.76-0.85 over seeds 0-7), and at worst clearly fewer (measured 6 vs 8).
    assert statistics.mean(shuffle) <= 0.9 * statistics.mean(rand)
    assert max(shuffle) <= 0.8 * max(rand)


def test_the_stream_loads_the_cluster() -> None:
    # Guards the scenario itself: enough heavy decodes run at once for a hotspot to form.
    assert statistics.mean(max_heavy_per_arrival("round_robin", 0)) >= 3


def test_over_four_instances_shuffle_stays_within_1_5x_and_random_does_not() -> None:
    for seed in range(3):  # measured: shuffle 1.27-1.36x, random 1.97-2.05x (seeds 0-2)
        assert busiest_over_idlest("shuffle", seed) <= 1.5
        assert busiest_over_idlest("random", seed) > 1.5
