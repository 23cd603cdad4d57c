"""Worker half of the KV connector: holds leases on the prefill side, pulls on the decode
side. It lives in vLLM's Worker process, next to the KV cache tensors.

Life of a hand-over, seen from here:
- prefill engine: the scheduler half hands over a `Lease` (blocks of a finished prefill).
  The lease waits in `_leases` until a decode worker pulls it, a client releases it, or it
  expires; then its engine request id is reported in `finished_sending` and vLLM frees the
  blocks.
- decode engine: the scheduler half hands over a `PlannedLoad`. A background thread picks
  the transport for the pair (`selection.choose_transport`) and pulls the remote blocks
  into the local blocks; when it ends, the request is reported in `finished_recving` (and
  on failure, including a forced transport that cannot work for the pair, its blocks in
  `get_block_ids_with_load_errors`, so vLLM recomputes them).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.channel import KVServer
from shuffleinfer.kv.metadata import Lease, PlannedLoad, ShuffleConnectorMetadata
from shuffleinfer.kv.selection import Endpoint, check_choice, choose_transport, host_identity
from shuffleinfer.kv.shared_cache import SharedCache
from shuffleinfer.kv.shm import ShmTransport
from shuffleinfer.kv.shm_segments import sweep_orphans
from shuffleinfer.kv.staging import StagedRuns, Stager
from shuffleinfer.kv.stats import ShuffleKVStats
from shuffleinfer.kv.tcp import TcpTransport
from shuffleinfer.kv.transport import KVSource, KVTransferError, Peer, PullRequest, Transport

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


class ConnectorWorker(KVSource):
    """The worker half; `ShuffleKVConnector` forwards the worker-side calls here.

    `transport` is "auto" or a forced transport name (`selection.py`); `auth_token` the
    secret every side-channel header must carry, if any; `host_id` this host's identity
    (defaults to `selection.host_identity()`).
    """

    def __init__(self, host: str, port: int, lease_s: float, pull_timeout_s: float,
                 lease_wait_s: float = _LEASE_WAIT_S,
                 stage_through_host: bool | None = None, transport: str = "auto",
                 auth_token: str | None = None, host_id: str | None = None,
                 staging_bytes: int = 0, share_cache: bool = True,
                 identity: dict[str, object] | None = None) -> None:
        """`staging_bytes` > 0: overlap mode, staging at most that many bytes.
        `share_cache`: move a CPU cache into shared memory (`shared_cache.py`).
        `identity`: what a peer must match besides the cache's layout (model,
        tensor-parallel size)."""
        self._share_cache = share_cache
        self._shared: SharedCache | None = None
        self._identity = identity
        self._host = host
        self._staging_bytes = staging_bytes
        self._stager: Stager | None = None
        self._transport = check_choice(transport)
        self._auth_token = auth_token
        self._host_id = host_id if host_id is not None else host_identity()
        self._transports: dict[str, Transport] = {}
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
        self._server: KVServer | None = None
        self._last_meta: ShuffleConnectorMetadata | None = None
        self._last_staged_meta: ShuffleConnectorMetadata | None = None

    # --- set-up -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], *,
                           num_blocks: int | None = None, block_dim: int | None = None
                           ) -> None:
        """Called once by vLLM after allocating the KV cache: start serving it.
        `num_blocks` and `block_dim` locate each tensor's block dimension
        (`block_views.find_block_dim`). Raises ValueError for caches it cannot serve."""
        if self._share_cache and all(t.device.type == "cpu" for t in kv_caches.values()):
            # First: views taken before would keep pointing at the old memory.
            self._shared = SharedCache.share(kv_caches)  # None: /dev/shm too small
        self._kv = KVCacheViews(kv_caches, num_blocks=num_blocks, block_dim=block_dim,
                                stage_through_host=self._stage_through_host,
                                identity=self._identity)
        if self._shared is not None:
            self._shared.describe_blocks(self._kv.block_geometry())
        sweep_orphans()  # segments of decode workers on this host that died unclosed
        self._transports = {"tcp": TcpTransport(self._auth_token),
                            "shm": ShmTransport(self._auth_token)}
        if self._kv.device.type == "cuda":
            from shuffleinfer.kv.nccl import NcclTransport

            self._transports["nccl"] = NcclTransport(self._kv.device, self._host,
                                                     self._auth_token)
        self._server = KVServer(self._host, self._port, self, self._transports,
                                io_timeout_s=self._pull_timeout_s,
                                auth_token=self._auth_token)
        self._server.start()
        if self._staging_bytes > 0 and self._kv.device.type == "cpu":
            self._stager = Stager(self._kv, self._staging_bytes)
        logger.info("KV server on %s:%d, %d layers, %d bytes per block, transports %s "
                    "(pulls by %s)", *self.address, len(self._kv.layer_names),
                    self._kv.block_bytes, sorted(self._transports), self._transport)

    @property
    def address(self) -> tuple[str, int]:
        """Where the KV server listens (the bound port when configured with port 0)."""
        if self._server is None:
            raise RuntimeError("the KV server starts in register_kv_caches")
        return self._server.address

    @property
    def host_id(self) -> str | None:
        """This worker's host identity, as compared with a prefill's at pull time."""
        return self._host_id

    @property
    def stager(self) -> Stager | None:
        """The overlap mode's staging (None: whole-request mode)."""
        return self._stager

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._stager is not None:
            self._stager.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for transport in self._transports.values():
            transport.close()

    # --- per step -----------------------------------------------------------------------
    def on_metadata(self, meta: ShuffleConnectorMetadata) -> None:
        """Called every engine step, before its forward pass, with the scheduler half's
        news (once per object)."""
        if meta is self._last_meta:
            return
        self._last_meta = meta
        if self._stager is not None:
            # The forward may write these blocks (freed): copies out of them end first.
            self._stager.fence(meta.fences + meta.dropped)
            for tid in meta.dropped:
                self._stager.release(tid)
            for lease in meta.new_leases:
                self._stager.finish(lease.transfer_id, lease.block_ids)
        now = time.monotonic()
        with self._lock:
            for lease in meta.new_leases:
                self._leases[lease.transfer_id] = _HeldLease(lease, now + self._lease_s)
            if meta.new_leases:
                self._lock.notify_all()
        for load in meta.new_loads:
            self._pool.submit(self._pull, load)

    def after_forward(self, meta: ShuffleConnectorMetadata) -> None:
        """Called after the step's forward pass: stage the blocks it completed."""
        if self._stager is None or meta is self._last_staged_meta:
            return
        self._last_staged_meta = meta
        staged = sum(self._stager.stage(b.transfer_id, b.num_blocks, b.first_index, b.block_ids)
                     for b in meta.stage)
        if staged:
            with self._lock:
                self._stats.record_overlapped(staged)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """Called every step: report ended sends (pulled/released/expired) and pulls."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for req_id in finished_req_ids:
                self._finished_seen.setdefault(req_id, now)
            for tid, held in list(self._leases.items()):
                if not held.serving and held.expires_at <= now:
                    logger.warning("KV lease %s expired unpulled", tid)
                    self._stats.record_expired()
                    self._end_lease(tid)
                    expired.append(tid)
            sending = {r for r in self._done_sending if r in self._finished_seen}
            self._done_sending -= sending
            for req_id in sending:
                del self._finished_seen[req_id]
            self._forget_old_finished(now)
            recving, self._done_recving = self._done_recving, set()
        for tid in expired:
            self._unstage(tid)
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
    def views_for_pull(self, request: PullRequest) -> list[memoryview]:
        staged = self._staged_runs(request)
        self._grant(request, rows=False)
        return staged.views() if staged is not None \
            else self._require_kv().read_views(request.block_ids)

    def staged_for_pull(self, request: PullRequest) -> StagedRuns | None:
        staged = self._staged_runs(request)
        if staged is not None:
            self._grant(request, rows=False)
        return staged

    def shared_for_pull(self, request: PullRequest, claimed: str | None = None
                        ) -> tuple[dict[str, object], list[list[int]] | None] | None:
        if self._shared is None or self._require_kv().stage:
            return None  # (staged through host memory: read_views are copies)
        self._grant(request, rows=False)
        if claimed == self._shared.cache_id:
            return self._shared.described, None  # the client found the runs itself
        try:
            return self._shared.described, self._shared.runs(
                self._require_kv().host_spans(request.block_ids))
        except BaseException:
            self.on_pull_done(request.transfer_id, False)
            raise

    def rows_for_pull(self, request: PullRequest) -> list[torch.Tensor]:
        self._grant(request, rows=True)
        return self._require_kv().read_rows(request.block_ids)

    def _staged_runs(self, request: PullRequest) -> StagedRuns | None:
        """Overlap mode: where the asked blocks sit staged, once their copies are done
        (None: not staged; read the engine's blocks)."""
        if self._stager is None:
            return None
        lease = self._wait_for_lease(request.transfer_id).lease
        where = {b: i for i, b in enumerate(lease.block_ids)}
        if any(b not in where for b in request.block_ids):
            return None  # _grant refuses it
        return self._stager.runs_for_pull(request.transfer_id,
                                          [where[b] for b in request.block_ids])

    def _wait_for_lease(self, transfer_id: str) -> _HeldLease:
        """The transfer's lease, waiting a little for it to be registered (a pull may
        race the engine step that leases it)."""
        deadline = time.monotonic() + self._lease_wait_s
        with self._lock:
            while (held := self._leases.get(transfer_id)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KVTransferError(f"no lease for transfer {transfer_id}")
                self._lock.wait(remaining)
        return held

    def _grant(self, request: PullRequest, rows: bool) -> None:
        """Check the request against its lease (waiting a little for the lease to be
        registered) and mark the lease as being served."""
        self._require_kv().check_layout(request.layout, rows=rows)
        self._wait_for_lease(request.transfer_id)
        with self._lock:
            held = self._leases.get(request.transfer_id)
            if held is None:
                raise KVTransferError(f"the lease of {request.transfer_id} ended")
            if held.serving:
                raise KVTransferError(f"transfer {request.transfer_id} is already pulled")
            unknown = set(request.block_ids) - set(held.lease.block_ids)
            if unknown:
                raise KVTransferError(f"blocks {sorted(unknown)} are not in the lease")
            held.serving = True

    def _require_kv(self) -> KVCacheViews:
        if self._kv is None:
            raise RuntimeError("the KV cache is registered in register_kv_caches")
        return self._kv

    def on_pull_done(self, transfer_id: str, ok: bool) -> None:
        with self._lock:
            self._end_lease(transfer_id)
        self._unstage(transfer_id, reusable=ok)

    def on_release(self, transfer_id: str) -> None:
        with self._lock:
            self._end_lease(transfer_id)
        self._unstage(transfer_id)

    def _unstage(self, transfer_id: str, reusable: bool = True) -> None:
        if self._stager is not None:
            self._stager.release(transfer_id, reusable=reusable)

    def on_unauthorized(self, client: str) -> None:
        with self._lock:
            self._stats.record_unauthorized()

    def _end_lease(self, transfer_id: str) -> None:
        held = self._leases.pop(transfer_id, None)
        if held is not None:
            self._done_sending.add(held.lease.engine_req_id)

    # --- decode side: pulling (pool threads) --------------------------------------------
    def _pull(self, load: PlannedLoad) -> None:
        kv = self._require_kv()
        started = time.perf_counter()
        name = None if self._transport == "auto" else self._transport
        try:
            name = choose_transport(self._transport, Endpoint(self._host_id, kv.device.type),
                                    Endpoint(load.remote_host_id, load.remote_kv_device))
            transport = self._transports.get(name)
            if transport is None:
                raise KVTransferError(f"transport {name} is not available on this worker "
                                      f"(KV cache on {kv.device})")
            request = PullRequest(load.transfer_id, load.remote_block_ids, kv.layout)
            nbytes = transport.pull(Peer(load.remote_host, load.remote_port), request, kv,
                                    load.local_block_ids, self._pull_timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure means: recompute these blocks
            logger.warning("KV pull %s by %s failed, its %d blocks will be recomputed: %s",
                           load.transfer_id, name or "(no transport)",
                           len(load.local_block_ids), e)
            with self._lock:
                self._stats.record_failure(name, recomputed_tokens=load.num_tokens)
                self._load_errors.update(load.local_block_ids)
                self._done_recving.add(load.engine_req_id)
            return
        with self._lock:
            self._stats.record_transfer(nbytes, time.perf_counter() - started, name)
            self._done_recving.add(load.engine_req_id)
