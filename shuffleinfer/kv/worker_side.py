"""Worker half of the KV connector: holds leases on the prefill side, pulls on the decode
side. It lives in vLLM's Worker process, next to the KV cache tensors.

Life of a hand-over, seen from here:
- prefill engine: the scheduler half hands over a `Lease` (blocks of a finished prefill).
  The lease waits in `_leases` until a decode worker pulls it, a client releases it, or it
  expires; then its engine request id is reported in `finished_sending` and vLLM frees the
  blocks.
- decode engine: the scheduler half hands over a `PlannedLoad`. A background thread pulls
  the remote blocks straight into the local blocks; when it ends, the request is reported
  in `finished_recving` (and on failure its blocks in `get_block_ids_with_load_errors`,
  so vLLM recomputes them).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shuffleinfer.kv import tcp
from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.metadata import Lease, PlannedLoad, ShuffleConnectorMetadata
from shuffleinfer.kv.stats import ShuffleKVStats

logger = logging.getLogger(__name__)

_LEASE_WAIT_S = 5.0
"""How long a pull waits for its lease to be registered (it may race the engine step)."""

_FINISHED_MEMORY_S = 60.0
"""How long a finished req id with no lease is remembered, in case its lease comes later.
Without a bound every request the engine ever finished would stay in memory."""


@dataclass
class _HeldLease:
    lease: Lease
    expires_at: float
    serving: bool = False


class ConnectorWorker(tcp.KVSource):
    """The worker half; `ShuffleKVConnector` forwards the worker-side calls here."""

    def __init__(self, host: str, port: int, lease_s: float, pull_timeout_s: float,
                 lease_wait_s: float = _LEASE_WAIT_S,
                 stage_through_host: bool | None = None) -> None:
        self._host = host
        self._stage_through_host = stage_through_host
        self._port = port
        self._lease_s = lease_s
        self._pull_timeout_s = pull_timeout_s
        self._lease_wait_s = lease_wait_s
        self._lock = threading.Condition()
        self._leases: dict[str, _HeldLease] = {}
        self._done_sending: set[str] = set()
        self._done_recving: set[str] = set()
        self._load_errors: set[int] = set()
        self._finished_seen: dict[str, float] = {}  # req id -> first seen, oldest first
        self._stats = ShuffleKVStats()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shuffleinfer-kv-pull")
        self._kv: KVCacheViews | None = None
        self._server: tcp.KVServer | None = None
        self._last_meta: ShuffleConnectorMetadata | None = None

    # --- set-up -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Called once by vLLM after allocating the KV cache: start serving it."""
        self._kv = KVCacheViews(kv_caches, stage_through_host=self._stage_through_host)
        self._server = tcp.KVServer(self._host, self._port, self,
                                    io_timeout_s=self._pull_timeout_s)
        self._server.start()
        logger.info("KV server on %s:%d, %d layers, %d bytes per block", *self.address,
                    len(self._kv.layer_names), self._kv.block_bytes)

    @property
    def address(self) -> tuple[str, int]:
        """Where the KV server listens (the bound port when configured with port 0)."""
        if self._server is None:
            raise RuntimeError("the KV server starts in register_kv_caches")
        return self._server.address

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- per step -----------------------------------------------------------------------
    def on_metadata(self, meta: ShuffleConnectorMetadata) -> None:
        """Called every engine step with the scheduler half's news (once per object)."""
        if meta is self._last_meta:
            return
        self._last_meta = meta
        now = time.monotonic()
        with self._lock:
            for lease in meta.new_leases:
                self._leases[lease.transfer_id] = _HeldLease(lease, now + self._lease_s)
            if meta.new_leases:
                self._lock.notify_all()
        for load in meta.new_loads:
            self._pool.submit(self._pull, load)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """Called every step: report ended sends (pulled/released/expired) and pulls."""
        now = time.monotonic()
        with self._lock:
            for req_id in finished_req_ids:
                self._finished_seen.setdefault(req_id, now)
            for tid, held in list(self._leases.items()):
                if not held.serving and held.expires_at <= now:
                    logger.warning("KV lease %s expired unpulled", tid)
                    self._stats.record_expired()
                    self._end_lease(tid)
            sending = {r for r in self._done_sending if r in self._finished_seen}
            self._done_sending -= sending
            for req_id in sending:
                del self._finished_seen[req_id]
            self._forget_old_finished(now)
            recving, self._done_recving = self._done_recving, set()
        return sending, recving

    def _forget_old_finished(self, now: float) -> None:
        """Drop finished req ids older than _FINISHED_MEMORY_S that no lease still needs."""
        cutoff = now - _FINISHED_MEMORY_S
        oldest = next(iter(self._finished_seen.values()), None)
        if oldest is None or oldest > cutoff:
            return
        needed = {h.lease.engine_req_id for h in self._leases.values()} | self._done_sending
        for req_id, seen_at in list(self._finished_seen.items()):
            if seen_at > cutoff:
                break
            del self._finished_seen[req_id]
            if req_id in needed:
                self._finished_seen[req_id] = now  # still leased: keep, re-queued as new

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def get_stats(self) -> ShuffleKVStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, ShuffleKVStats()
        return stats

    # --- prefill side: serving leases (server threads) ----------------------------------
    def views_for_pull(self, request: tcp.PullRequest) -> list[memoryview]:
        assert self._kv is not None, "KV server runs only after register_kv_caches"
        self._kv.check_layout(request.layout)
        deadline = time.monotonic() + self._lease_wait_s
        with self._lock:
            while (held := self._leases.get(request.transfer_id)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise tcp.KVTransferError(f"no lease for transfer {request.transfer_id}")
                self._lock.wait(remaining)
            if held.serving:
                raise tcp.KVTransferError(f"transfer {request.transfer_id} is already pulled")
            unknown = set(request.block_ids) - set(held.lease.block_ids)
            if unknown:
                raise tcp.KVTransferError(f"blocks {sorted(unknown)} are not in the lease")
            held.serving = True
        return self._kv.read_views(request.block_ids)

    def on_pull_done(self, transfer_id: str, ok: bool) -> None:
        with self._lock:
            self._end_lease(transfer_id)

    def on_release(self, transfer_id: str) -> None:
        with self._lock:
            self._end_lease(transfer_id)

    def _end_lease(self, transfer_id: str) -> None:
        held = self._leases.pop(transfer_id, None)
        if held is not None:
            self._done_sending.add(held.lease.engine_req_id)

    # --- decode side: pulling (pool threads) --------------------------------------------
    def _pull(self, load: PlannedLoad) -> None:
        assert self._kv is not None
        started = time.perf_counter()
        request = tcp.PullRequest(load.transfer_id, load.remote_block_ids, self._kv.layout)
        try:
            dest = self._kv.write_views(load.local_block_ids)
            nbytes = tcp.pull(load.remote_host, load.remote_port, request, dest.views,
                              self._pull_timeout_s)
            dest.commit()
        except Exception as e:  # noqa: BLE001 - any failure means: recompute these blocks
            logger.warning("KV pull %s failed, its %d blocks will be recomputed: %s",
                           load.transfer_id, len(load.local_block_ids), e)
            with self._lock:
                self._stats.record_failure()
                self._load_errors.update(load.local_block_ids)
                self._done_recving.add(load.engine_req_id)
            return
        with self._lock:
            self._stats.record_transfer(nbytes, time.perf_counter() - started)
            self._done_recving.add(load.engine_req_id)
