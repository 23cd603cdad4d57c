"""Prometheus metrics of one api instance, in a registry the app owns.

Request metrics are measured at the api, as a client sees them: TTFT runs from the moment
the request arrived to the moment its first token is ready to leave; inter-token latency
is the gap between token-bearing deltas, split evenly over the tokens a delta carries.
KV hand-over metrics mirror the backend's cumulative counters on each scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shuffleinfer.protocol import Backend, KVTransferStats, TokenDelta, TransportStats

logger = logging.getLogger(__name__)

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                  2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
KV_TRANSFER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                         1.0, 2.5, 5.0, 10.0)


def mirror(counter: Counter, now_total: float, seen_total: float) -> None:
    """Advance `counter` by what a backend's cumulative total gained since last seen."""
    # A smaller total means an instance restarted: its old counts are gone, and counting
    # from the new total on is the best we can do.
    if now_total > seen_total:
        counter.inc(now_total - seen_total)


class ApiMetrics:
    """All metrics of one app; several apps in one process do not share anything."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shuffleinfer_requests", "HTTP requests by endpoint and "
                                "outcome (status code, or 'aborted' on client disconnect)",
                                ["endpoint", "status"], registry=r)
        self.requests_held = Gauge("shuffleinfer_requests_held", "Generation requests the "
                                   "server holds now (running or waiting in the cluster)",
                                   registry=r)
        self.failovers = Counter("shuffleinfer_failovers", "Requests moved off an instance "
                                 "that died, by leg (prefill: prefilled again on another; "
                                 "decode: continued on another)", ["leg"], registry=r)
        self._failovers_seen: dict[str, int] = {}
        self.ttft = Histogram("shuffleinfer_time_to_first_token_seconds", "Request arrival "
                              "to first token, measured at the api", buckets=TTFT_BUCKETS_S,
                              registry=r)
        self.itl = Histogram("shuffleinfer_inter_token_latency_seconds", "Time between "
                             "successive output tokens, measured at the api",
                             buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("shuffleinfer_e2e_request_latency_seconds", "Request arrival "
                             "to last token of finished requests", buckets=E2E_BUCKETS_S,
                             registry=r)
        self.prompt_tokens = Counter("shuffleinfer_prompt_tokens", "Prompt tokens of "
                                     "requests that got a first token", registry=r)
        self.generation_tokens = Counter("shuffleinfer_generation_tokens", "Generated "
                                         "tokens streamed out of the backend", registry=r)
        self.prefilled = Counter("shuffleinfer_requests_prefilled", "Requests whose prefill "
                                 "ran on this instance", ["instance"], registry=r)
        self.decoded = Counter("shuffleinfer_requests_decoded", "Requests whose decode ran "
                               "on this instance", ["instance"], registry=r)
        self.kv_transfers = Counter("shuffleinfer_kv_transfers", "KV cache hand-overs from "
                                    "prefill to decode instances, by transport",
                                    ["transport"], registry=r)
        self.kv_transfer_failures = Counter("shuffleinfer_kv_transfer_failures", "Failed KV "
                                            "cache hand-overs, by transport (none: failed "
                                            "before one was chosen)", ["transport"],
                                            registry=r)
        self.kv_transfer_bytes = Counter("shuffleinfer_kv_transfer_bytes", "Bytes of KV "
                                         "cache handed over, by transport", ["transport"],
                                         registry=r)
        self.kv_transfer_seconds = Histogram("shuffleinfer_kv_transfer_seconds", "Duration "
                                             "of one KV cache hand-over, by transport",
                                             ["transport"], buckets=KV_TRANSFER_BUCKETS_S,
                                             registry=r)
        self.kv_expired_leases = Counter("shuffleinfer_kv_expired_leases", "Prefill-side "
                                         "KV leases that expired unpulled (blocks freed)",
                                         registry=r)
        self.kv_recomputed_tokens = Counter("shuffleinfer_kv_recomputed_tokens", "Prompt "
                                            "tokens a decode instance computed itself "
                                            "because their KV did not arrive", registry=r)
        self.kv_unauthorized = Counter("shuffleinfer_kv_unauthorized", "KV server requests "
                                       "refused for a missing or wrong cluster token",
                                       registry=r)
        self.kv_overlapped_blocks = Counter("shuffleinfer_kv_overlapped_blocks", "KV "
                                            "blocks a prefill instance copied out for the "
                                            "hand-over while their prompt was still "
                                            "prefilling (overlap mode)", registry=r)
        self.kv_stats_errors = Counter("shuffleinfer_kv_stats_errors", "Scrapes on which "
                                       "backend.kv_stats() failed (KV metrics left stale)",
                                       registry=r)
        self.admin_actions = Counter("shuffleinfer_admin_actions", "Admin calls by action "
                                     "(list, drain, resume, flip) and outcome (ok, or the "
                                     "error type of the refusal)", ["action", "outcome"],
                                     registry=r)
        self._kv_seen = KVTransferStats()

    def count_request(self, endpoint: str, status: int | str) -> None:
        """Count one finished request; call exactly once per request."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def count_admin_action(self, action: str, outcome: str) -> None:
        """Count one admin call, answered or refused; call exactly once per call."""
        self.admin_actions.labels(action=action, outcome=outcome).inc()

    def start_request(self, arrived_at: float) -> RequestMetrics:
        """Begin per-request timing; `arrived_at` is a `clock()` reading."""
        return RequestMetrics(self, arrived_at)

    async def refresh_failovers(self, backend: Backend) -> None:
        """Pull the backend's cumulative failover counts into ours (on each scrape)."""
        try:
            counts = await backend.failover_stats()
        except Exception:
            logger.exception("backend.failover_stats() failed; failover metrics are stale")
            return
        for leg, total in counts.items():
            mirror(self.failovers.labels(leg), total, self._failovers_seen.get(leg, 0))
        self._failovers_seen = dict(counts)

    async def refresh_kv(self, backend: Backend) -> None:
        """Pull the backend's cumulative KV counters into ours (called on each scrape)."""
        try:
            stats = await backend.kv_stats()
        except Exception:
            logger.exception("backend.kv_stats() failed; KV transfer metrics are stale")
            self.kv_stats_errors.inc()
            return
        seen = self._kv_seen
        for name, now in stats.transports.items():
            before = seen.transports.get(name, TransportStats())
            mirror(self.kv_transfers.labels(name), now.num_transfers, before.num_transfers)
            mirror(self.kv_transfer_failures.labels(name), now.num_failures,
                   before.num_failures)
            mirror(self.kv_transfer_bytes.labels(name), now.num_bytes, before.num_bytes)
            for seconds in now.seconds:
                self.kv_transfer_seconds.labels(name).observe(seconds)
        mirror(self.kv_expired_leases, stats.num_expired_leases, seen.num_expired_leases)
        mirror(self.kv_recomputed_tokens, stats.num_recomputed_tokens,
               seen.num_recomputed_tokens)
        mirror(self.kv_unauthorized, stats.num_unauthorized, seen.num_unauthorized)
        mirror(self.kv_overlapped_blocks, stats.num_overlapped_blocks,
               seen.num_overlapped_blocks)
        self._kv_seen = stats

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class RequestMetrics:
    """Timing of one request; fed every delta the backend yields."""

    def __init__(self, metrics: ApiMetrics, arrived_at: float) -> None:
        self._metrics = metrics
        self._arrived_at = arrived_at
        self._last_token_at: float | None = None
        self._num_prompt_tokens = 0
        self._counted_prefill = False
        self._counted_decode = False

    def set_prompt(self, num_prompt_tokens: int) -> None:
        """Record the prompt length; it is counted once the first token arrives."""
        self._num_prompt_tokens = num_prompt_tokens

    def on_delta(self, delta: TokenDelta) -> None:
        """Called for each delta, just before its tokens are sent to the client."""
        m = self._metrics
        now = m.clock()
        num_tokens = len(delta.token_ids)
        if num_tokens:
            if self._last_token_at is None:
                m.ttft.observe(now - self._arrived_at)
                m.prompt_tokens.inc(self._num_prompt_tokens)
            else:
                gap_s = (now - self._last_token_at) / num_tokens
                for _ in range(num_tokens):
                    m.itl.observe(gap_s)
            self._last_token_at = now
            m.generation_tokens.inc(num_tokens)
        if delta.prefill_instance is not None and not self._counted_prefill:
            m.prefilled.labels(instance=delta.prefill_instance).inc()
            self._counted_prefill = True
        if delta.decode_instance is not None and not self._counted_decode:
            m.decoded.labels(instance=delta.decode_instance).inc()
            self._counted_decode = True

    def on_finish(self) -> None:
        """Called once when the request finished normally (not on errors or aborts)."""
        m = self._metrics
        m.e2e.observe(m.clock() - self._arrived_at)
