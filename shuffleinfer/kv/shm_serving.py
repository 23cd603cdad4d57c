"""The shm transport's prefill side (`shm.ShmTransport.serve_pull`): where a pull's bytes
can be mapped from (a staging segment or the shared cache) and the exchange that ends its
lease, or, when neither applies, filling the decode side's segment with progress frames."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from shuffleinfer.kv.channel import recv_frame, send_frame
from shuffleinfer.kv.shm_segments import Segment
from shuffleinfer.kv.transport import KVSource, KVTransferError, PullRequest

logger = logging.getLogger(__name__)


def where_mapped(header: dict[str, Any], request: PullRequest, source: KVSource
                 ) -> dict[str, Any] | None:
    """Where the client may map the pull's bytes from, as far as its header allows, with
    the lease granted: a staging segment first, then the shared cache; None (lease
    untouched) if neither. A client that already copies from the shared cache (header
    "claimed") is answered from it first. Raises KVTransferError to refuse (lease
    untouched)."""
    claimed = header.get("claimed")
    claimed = claimed if isinstance(claimed, str) else None

    def staged() -> dict[str, Any] | None:
        if header.get("staged_ok") is not True:
            return None
        found = source.staged_for_pull(request)
        return None if found is None else {"staged": found.segment.name, "runs": found.runs}

    def cache() -> dict[str, Any] | None:
        if header.get("cache_ok") is not True:
            return None
        found = source.shared_for_pull(request, claimed)
        if found is None:
            return None
        described, runs = found
        if runs is None:  # the client copies from this very cache: it has all it needs
            return {"cache": {"id": claimed}}
        return {"cache": described, "runs": runs}

    for where in (cache, staged) if claimed is not None else (staged, cache):
        found = where()
        if found is not None:
            return found
    return None


def serve_mapped(sock: socket.socket, where: dict[str, Any], request: PullRequest,
                 source: KVSource) -> bool:
    """Say where the client maps the pull's bytes from (a staging segment, or the shared
    cache) and the runs in it; the lease ends when the client says it copied them out
    (or fails: then a staging segment is not reused)."""
    ok = False
    try:
        send_frame(sock, {"ok": True, "error": None} | where)
        ok = recv_frame(sock).get("op") == "done"
    except (OSError, ValueError, KVTransferError) as e:
        logger.warning("KV pull %s by shm (mapped) failed: %s", request.transfer_id, e)
    finally:
        source.on_pull_done(request.transfer_id, ok)
    return ok


def progress_teller(sock: socket.socket, step: object) -> Callable[[int], None] | None:
    """What tells the client each time another `step` bytes are in (None: it did not
    ask; it then copies everything after the final reply)."""
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        return None
    told = 0

    def tell(filled: int) -> None:
        nonlocal told
        if filled - told >= step:
            send_frame(sock, {"ok": True, "filled": filled})
            told = filled

    return tell


def fill_segment(segment: Segment, nbytes: int, views: Sequence[memoryview],
                 progress: Callable[[int], None] | None = None) -> str | None:
    """Copy the granted blocks into the pull's first `nbytes` of the segment, calling
    `progress` with the bytes in so far after each block; returns why not, if the
    blocks do not fill exactly that."""
    total = sum(len(v) for v in views)
    if total != nbytes:
        return f"shm segment has {nbytes} bytes, the blocks {total}"
    offset = 0
    for view in views:
        segment.buf[offset:offset + len(view)] = view
        offset += len(view)
        if progress is not None:
            progress(offset)
    return None
