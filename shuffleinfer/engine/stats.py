"""A vLLM stat logger that keeps what ShuffleInfer needs from the engine's own stats:
the latest scheduler snapshot (load) and the KV connector's transfer counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from shuffleinfer.kv.stats import ShuffleKVStats
from shuffleinfer.protocol import KVTransferStats


class _Logger(StatLoggerBase):
    def __init__(self, collector: EngineStatsCollector) -> None:
        self._collector = collector

    def record(self, scheduler_stats: Any, iteration_stats: Any,
               mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        self._collector.latest = scheduler_stats
        if self._collector.on_step is not None:
            self._collector.on_step(scheduler_stats)
        if scheduler_stats.kv_connector_stats:
            self._collector.kv.aggregate(
                ShuffleKVStats.from_dict(scheduler_stats.kv_connector_stats))

    def log_engine_initialized(self) -> None:
        return None


class EngineStatsCollector:
    """Owned by an EngineInstance; vLLM calls `factory` once per engine core."""

    def __init__(self, on_step: Callable[[Any], None] | None = None) -> None:
        self.latest: Any = None
        self.on_step = on_step
        """Called with the scheduler stats after every engine step (in the engine's loop)."""
        self.kv = ShuffleKVStats()

    def factory(self, vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        return _Logger(self)

    def kv_stats(self) -> KVTransferStats:
        return self.kv.drain()
