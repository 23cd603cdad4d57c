"""Overlap mode, prefill side: a leased prompt's KV leaves the engine's cache chunk by
chunk, while the later chunks are still computing.

The scheduler half tells the worker half, step by step, which of a prompt's blocks the
step completes (`metadata.StageBlocks`); after the step's forward pass the worker hands
them to a `Stager`, whose thread copies them into a staging segment (a shared-memory file
of the worker's own, laid out as the wire orders the whole prompt: layer by layer, block
by block). When the prefill finishes, only its last chunk is left to copy, so a pull
finds its bytes ready:
- shm: the decode side maps the staging segment and copies out of it (one copy on that
  side; the prefill side's copy already happened during the prefill);
- tcp: the server sends straight from the segment.
nccl moves device memory itself and does not stage.

Staging is by a block's place in the prompt, not by its id: a preempted request that is
recomputed into other blocks keeps what was staged (the KV of a prompt position depends
only on the tokens before it). A copy reads engine blocks on another thread, so blocks
that may be freed (a request preempted, aborted or finished without a lease) are
`fence`d before the next forward pass can write them. A transfer that would take the
staged bytes past `max_bytes` is not staged: its pull reads the engine's blocks, as in
whole-request mode.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.errors import KVTransferError
from shuffleinfer.kv.shm_segments import Segment, SegmentPool

logger = logging.getLogger(__name__)

_POOL_KEY = "staging"
IDLE_SEGMENTS = 4
"""Staging segments kept for reuse (a new one costs its pages' allocation)."""


@dataclass
class _Staged:
    segment: Segment
    num_blocks: int
    staged: list[bool]
    pending: list[Future[None]] = field(default_factory=list)


@dataclass(frozen=True)
class StagedRuns:
    """Where a pull's bytes sit in a staging segment: `runs` of (offset, length), in wire
    order."""

    segment: Segment
    runs: list[tuple[int, int]]

    def views(self) -> list[memoryview]:
        return [self.segment.buf[offset:offset + n] for offset, n in self.runs]


def pieces(src_sizes: Sequence[int], dst_sizes: Sequence[int]
           ) -> Iterator[tuple[int, int, int, int, int]]:
    """How to copy buffers of `src_sizes` bytes, one after the other, into buffers of
    `dst_sizes`: (src index, offset in it, dst index, offset in it, bytes) per piece.
    Raises ValueError, before any piece, unless both hold the same number of bytes."""
    total = sum(src_sizes)
    if total != sum(dst_sizes):
        raise ValueError(f"{total} bytes cannot fill {sum(dst_sizes)}")
    si = di = s_off = d_off = 0
    while si < len(src_sizes) and di < len(dst_sizes):
        n = min(src_sizes[si] - s_off, dst_sizes[di] - d_off)
        yield si, s_off, di, d_off, n
        s_off, d_off = s_off + n, d_off + n
        if s_off == src_sizes[si]:
            si, s_off = si + 1, 0
        if d_off == dst_sizes[di]:
            di, d_off = di + 1, 0


def copy_views(src: Sequence[memoryview], dst: Sequence[memoryview]) -> int:
    """Copy the bytes of `src` (one after the other) into `dst` (one after the other);
    both must hold the same number of bytes. numpy copies without the GIL."""
    plan = list(pieces([len(v) for v in src], [len(v) for v in dst]))
    for si, s_off, di, d_off, n in plan:
        np.copyto(np.frombuffer(dst[di], np.uint8, n, d_off),
                  np.frombuffer(src[si], np.uint8, n, s_off))
    return sum(len(v) for v in src)


def _wait(copies: Sequence[Future[None]]) -> bool:
    """Wait for copies; False (logged) if one failed: its transfer is pulled whole."""
    ok = True
    for f in copies:
        try:
            f.result()
        except Exception:  # noqa: BLE001 - a failed copy only costs the staging
            logger.exception("a KV staging copy failed")
            ok = False
    return ok


class Stager:
    """The staged transfers of one prefill worker. Thread-safe; one copy thread."""

    def __init__(self, kv: KVCacheViews, max_bytes: int) -> None:
        self._kv = kv
        self._num_layers = len(kv.layer_names)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._staged: dict[str, _Staged] = {}
        self._refused: set[str] = set()
        self._pool = SegmentPool(IDLE_SEGMENTS)
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shuffleinfer-kv-stage")

    def _bytes_in_use(self) -> int:
        return sum(s.num_blocks for s in self._staged.values()) \
            * self._num_layers * self._kv.block_bytes

    def stage(self, transfer_id: str, num_blocks: int, first_index: int,
              block_ids: Sequence[int]) -> int:
        """Called after a forward pass: blocks `first_index, first_index+1, ...` of the
        transfer's `num_blocks` are complete in `block_ids`; copy them out (in the
        background). The first call opens the transfer's staging segment. Returns how
        many blocks it set out to copy (0: already staged, or not staged at all)."""
        with self._lock:
            if transfer_id in self._refused:
                return 0
            staged = self._staged.get(transfer_id)
            if staged is None:
                nbytes = num_blocks * self._num_layers * self._kv.block_bytes
                if self._bytes_in_use() + nbytes > self._max_bytes:
                    logger.info("KV staging is full: transfer %s is pulled whole", transfer_id)
                    self._refused.add(transfer_id)
                    return 0
                try:
                    segment = self._pool.acquire(_POOL_KEY, nbytes)
                except (OSError, KVTransferError) as e:
                    logger.warning("no KV staging segment for %s (pulled whole): %s",
                                   transfer_id, e)
                    self._refused.add(transfer_id)
                    return 0
                staged = _Staged(segment, num_blocks, [False] * num_blocks)
                self._staged[transfer_id] = staged
            todo = [(i, b) for i, b in enumerate(block_ids, first_index)
                    if i < staged.num_blocks and not staged.staged[i]]
            if not todo:
                return 0
            for i, _ in todo:
                staged.staged[i] = True
            staged.pending = [f for f in staged.pending if not f.done()]
            staged.pending.append(self._copier.submit(self._copy, staged, todo))
            return len(todo)

    def finish(self, transfer_id: str, block_ids: Sequence[int]) -> None:
        """Called when the prefill is leased: copy whatever blocks are not staged yet (the
        last chunk). A transfer never staged stays unstaged (pulled from the blocks)."""
        with self._lock:
            known = transfer_id in self._staged
        if known:
            self.stage(transfer_id, len(block_ids), 0, block_ids)

    def _copy(self, staged: _Staged, todo: list[tuple[int, int]]) -> None:
        blocks = tuple(b for _, b in todo)
        lbb = self._kv.block_bytes
        buf = staged.segment.buf
        for layer, views in enumerate(self._kv.layer_views(blocks)):
            copy_views(views, [buf[(layer * staged.num_blocks + index) * lbb:][:lbb]
                               for index, _ in todo])

    def fence(self, transfer_ids: Sequence[str]) -> None:
        """Called before a forward pass that may write the transfers' blocks (they were
        freed): wait for their copies in flight."""
        with self._lock:
            pending = [f for t in transfer_ids if (s := self._staged.get(t)) is not None
                       for f in s.pending]
        _wait(pending)

    def runs_for_pull(self, transfer_id: str, indices: Sequence[int]) -> StagedRuns | None:
        """Where the bytes of the transfer's blocks `indices` (consecutive) sit, once
        every copy is done; None if the transfer is not (wholly) staged."""
        with self._lock:
            staged = self._staged.get(transfer_id)
            if staged is None or not all(0 <= i < staged.num_blocks and staged.staged[i]
                                         for i in indices):
                return None
            pending = list(staged.pending)
        if not indices or list(indices) != list(range(indices[0], indices[0] + len(indices))):
            return None
        if not _wait(pending):
            return None
        lbb = self._kv.block_bytes
        return StagedRuns(staged.segment, [
            ((layer * staged.num_blocks + indices[0]) * lbb, len(indices) * lbb)
            for layer in range(self._num_layers)])

    def release(self, transfer_id: str, reusable: bool = True) -> None:
        """The transfer is over (pulled, released, expired or dropped): give its segment
        back, after its copies (`reusable=False`: a reader may still map it; unlink it)."""
        with self._lock:
            self._refused.discard(transfer_id)
            staged = self._staged.pop(transfer_id, None)
        if staged is None:
            return
        _wait(staged.pending)
        self._pool.release(_POOL_KEY, staged.segment, reusable=reusable)

    @property
    def num_staged(self) -> int:
        with self._lock:
            return len(self._staged)

    def close(self) -> None:
        self._copier.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            staged, self._staged = list(self._staged.values()), {}
        for s in staged:
            self._pool.release(_POOL_KEY, s.segment, reusable=False)
        self._pool.close()
