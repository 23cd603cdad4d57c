"""Prometheus metrics of the output-length predictor, mirrored from the backend's
cumulative counters on each scrape (like the KV hand-over metrics)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shuffleinfer.api.metrics import mirror
from shuffleinfer.protocol import Backend, PredictionStats

logger = logging.getLogger(__name__)

ABS_ERROR_BUCKETS = (5, 10, 25, 50, 100, 150, 200, 300, 500, 1000, 2000, 4000)
PREDICT_SECONDS_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1)


class PredictionMetrics:
    """Prediction outcomes, accuracy and latency in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.outcomes = Counter("shuffleinfer_predictions", "Output-length predictions made "
                                "beside the prefill, by outcome (on_time; late or failed: "
                                "the decode was placed with the prior)", ["outcome"],
                                registry=r)
        self.scored = Counter("shuffleinfer_prediction_scored", "Finished requests whose "
                              "predicted length was compared with the true one", registry=r)
        self.bucket_hits = Counter("shuffleinfer_prediction_bucket_hits", "Finished requests "
                                   "whose true length fell within the predicted bucket",
                                   registry=r)
        self.abs_error = Histogram("shuffleinfer_prediction_abs_error_tokens", "|predicted - "
                                   "true| output tokens per finished request",
                                   buckets=ABS_ERROR_BUCKETS, registry=r)
        self.seconds = Histogram("shuffleinfer_prediction_seconds", "Wall time of one "
                                 "prediction on a prefill instance",
                                 buckets=PREDICT_SECONDS_BUCKETS, registry=r)
        self.version = Gauge("shuffleinfer_predictor_version", "Updates the cluster's "
                             "output-length learner has made", registry=r)
        self.errors = Counter("shuffleinfer_prediction_stats_errors", "Scrapes on which "
                              "backend.prediction_stats() failed", registry=r)
        self._seen = PredictionStats()

    async def refresh(self, backend: Backend) -> None:
        """Pull the backend's counters into ours (called on each scrape)."""
        try:
            stats = await backend.prediction_stats()
        except Exception:
            logger.exception("backend.prediction_stats() failed; prediction metrics are stale")
            self.errors.inc()
            return
        seen = self._seen
        mirror(self.outcomes.labels("on_time"), stats.num_on_time, seen.num_on_time)
        mirror(self.outcomes.labels("late"), stats.num_late, seen.num_late)
        mirror(self.outcomes.labels("failed"), stats.num_failed, seen.num_failed)
        mirror(self.scored, stats.num_scored, seen.num_scored)
        mirror(self.bucket_hits, stats.num_bucket_hits, seen.num_bucket_hits)
        for error in stats.abs_errors:
            self.abs_error.observe(error)
        for seconds in stats.predict_seconds:
            self.seconds.observe(seconds)
        self.version.set(stats.version)
        self._seen = stats
