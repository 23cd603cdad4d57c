"""The shm transport: same host only; block bytes go through shared memory.

The handshake is the tcp one over the same side channel; only the wire differs. The
decode side's header offers every path it can take, and the server picks the first that
applies:
1. staged (overlap mode): the prefill's blocks already sit in a staging segment of the
   prefill worker's own (`staging.py`); the server replies with its name and the pull's
   byte runs in it;
2. shared cache (a CPU cache, `shared_cache.py`): the server replies with how to map the
   prefill's KV cache itself and the runs in it.
   In both, the decode side maps what it is told (kept mapped between pulls), copies the
   runs into its blocks (the one copy of the hand-over) and says {"op": "done"}, after
   which the server ends the lease (and reuses the staging segment). Once a cache is
   mapped, and its reply said where each layer's blocks lie, later pulls from it copy
   while their request is on the way ("claimed": the cache id; the server then answers
   from the cache first, with only its id if it is the one claimed) and keep the copy
   only if the reply grants the lease on that cache (`_Claim`): this hides the round
   trip before the copy;
3. two copies, when neither applies: the decode side takes a segment of its pool for
   this prefill server (`SegmentPool`: one kept per pair and reused, grown when a pull
   needs more) and names it in the header ("shm_name", "shm_bytes": the pull's size,
   "progress_bytes"); the server maps it (`AttachedSegments`), grants the lease, copies
   the blocks in, saying {"ok": true, "filled": N} each time another "progress_bytes"
   are in, and replies ok; the decode side copies each filled part into its own blocks
   while the server fills the next, then gives the segment back.
Replies also name the server's local listener ("local", `channel.KVServer.local_name`):
once told, the decode side dials it for later pulls to that server (a Unix socket: its
sends cost less than TCP loopback's), and TCP again if it cannot be reached.
A segment is in at most one pull at a time. A pull that failed in any way gives its
segment up (unlinked at once): a server that stalled may still write into it later. The
decode worker unlinks the rest at shutdown (`close`); see `shm_segments` for the
segments' life, and for what is left behind when a worker dies. The server's half of
each path is in `shm_serving`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.channel import connect, connect_local, frame, recv_ok, send_frame
from shuffleinfer.kv.connections import ConnectionPool
from shuffleinfer.kv.shared_cache import PeerCaches, address_of
from shuffleinfer.kv.shm_segments import AttachedSegments, Segment, SegmentPool
from shuffleinfer.kv.shm_serving import fill_segment, progress_teller, serve_mapped, where_mapped
from shuffleinfer.kv.staging import copy_views
from shuffleinfer.kv.tcp import pull_header
from shuffleinfer.kv.transport import KVSource, KVTransferError, Peer, PullRequest, Transport

logger = logging.getLogger(__name__)

_DONE, _FAILED = frame({"op": "done"}), frame({"op": "failed"})
"""The decode side's last word on a mapped pull, encoded once (encoding one on the
pull's critical path, right after the copy, took about 40 us here)."""


def progress_step(nbytes: int) -> int:
    """Bytes between the server's progress frames: an eighth of the pull, at least 1 MiB
    (a frame costs tens of microseconds; a copy of 1 MiB about a hundred)."""
    return max(1 << 20, -(-nbytes // 8))


class Filler:
    """Copies `buf` into `views` (one after the other) in parts, as far as asked."""

    def __init__(self, buf: memoryview, views: Sequence[memoryview]) -> None:
        self._buf, self._views = buf, views
        self._view, self._in_view, self.copied = 0, 0, 0

    def fill_to(self, end: int) -> int:
        """Copy the segment's bytes up to `end` (or the views' end); returns bytes so far."""
        while self.copied < end and self._view < len(self._views):
            view = self._views[self._view]
            n = min(len(view) - self._in_view, end - self.copied)
            view[self._in_view:self._in_view + n] = self._buf[self.copied:self.copied + n]
            self.copied += n
            self._in_view += n
            if self._in_view == len(view):
                self._view, self._in_view = self._view + 1, 0
        return self.copied


class _Dest:
    """Where a pull lands: host memory, by (address, nbytes) spans or by views of it,
    each found only when first asked for."""

    def __init__(self, spans: Sequence[tuple[int, int]] | None,
                 views: Callable[[], Sequence[memoryview]]) -> None:
        self._spans, self._make_views = spans, views
        self._views: Sequence[memoryview] | None = None
        self.nbytes = sum(n for _, n in spans) if spans is not None else \
            sum(len(v) for v in self.views())

    def views(self) -> Sequence[memoryview]:
        if self._views is None:
            self._views = self._make_views()
        return self._views

    def spans(self) -> Sequence[tuple[int, int]]:
        if self._spans is None:
            self._spans = [(address_of(v), len(v)) for v in self.views()]
        return self._spans


class _Claim:
    """A pull from a shared cache this side has mapped, copied while its request is on
    the way (saving the round trip before the copy). The copy counts only if the server
    then grants the lease on the cache copied from (`holds`): a granted lease was alive
    when the server read the request, and a lease never comes back once ended, so the
    blocks were the request's all along (before its lease was registered, the prefill's
    scheduler held them). Otherwise the pull copies again as the reply says."""

    def __init__(self, caches: PeerCaches, peer: Peer, cache_id: str,
                 block_ids: tuple[int, ...], dest: _Dest) -> None:
        self._caches, self._peer, self._block_ids, self._dest = caches, peer, block_ids, dest
        self.cache_id = cache_id
        self._copied_from: str | None = None

    @classmethod
    def of(cls, caches: PeerCaches, peer: Peer, block_ids: tuple[int, ...], dest: _Dest
           ) -> _Claim | None:
        """A claim on `peer`'s mapped cache, if this side knows where its blocks lie."""
        cache_id = caches.claimable(peer)
        return None if cache_id is None else cls(caches, peer, cache_id, block_ids, dest)

    def copy(self) -> None:
        self._copied_from = self._caches.copy_claimed(self._peer, self._block_ids,
                                                      self._dest.spans())

    def holds(self, reply: dict[str, Any]) -> bool:
        """Whether the reply grants the lease on the cache copied from."""
        cache = reply.get("cache")
        return self._copied_from is not None and isinstance(cache, dict) \
            and str(cache.get("id")) == self._copied_from


class ShmTransport(Transport):
    """Bytes through /dev/shm: two memory copies, no socket traffic beyond the header.

    Decode side: a pool of at most `segments_per_peer` idle segments per prefill server
    (more only while more pulls to it run at once). Prefill side: the mappings of the
    segments it served, kept until their owner unlinks them."""

    name = "shm"

    def __init__(self, auth_token: str | None = None, segments_per_peer: int = 1) -> None:
        self._auth_token = auth_token
        self._pool = SegmentPool(segments_per_peer)
        self._attached = AttachedSegments()
        self._connections = ConnectionPool(dial=self._dial)
        self._local: dict[Peer, str] = {}
        """Servers' local listeners, as their replies named them."""
        self._local_name: str | None = None
        """The local listener of the server serving this transport, named in replies."""
        self._caches = PeerCaches()
        self._direct: set[Peer] = set()
        """Servers whose last pull came from their shared cache."""

    # --- decode side ----------------------------------------------------------------------
    def pull(self, peer: Peer, request: PullRequest, kv: KVCacheViews,
             local_block_ids: tuple[int, ...], timeout_s: float) -> int:
        if kv.stage:
            dest = kv.write_views(local_block_ids)
            nbytes = self.pull_views(peer, request, dest.views, timeout_s)
            dest.commit()
            return nbytes
        # Views only if the pull does not copy by address (they cost ~0.1 ms).
        return self._pull(peer, request, _Dest(kv.host_spans(local_block_ids),
                                               lambda: kv.read_views(local_block_ids)),
                          timeout_s)

    def pull_views(self, peer: Peer, request: PullRequest, dest_views: Sequence[memoryview],
                   timeout_s: float) -> int:
        """Pull the requested blocks into `dest_views` (same order); returns the bytes
        received."""
        return self._pull(peer, request, _Dest(None, lambda: dest_views), timeout_s)

    def _pull(self, peer: Peer, request: PullRequest, dest: _Dest, timeout_s: float) -> int:
        """Pull the requested blocks into `dest`; returns the bytes received. A server that
        served the last pull from its shared cache is offered no segment of the pool (one
        would sit idle), and its cache is copied from while the request is on the way
        (`_Claim`). Raises KVTransferError naming the transfer on any failure, after
        giving the segment up."""
        segment: Segment | None = None
        ok = False
        try:
            header = pull_header(request, "shm") | {
                "staged_ok": True, "cache_ok": peer not in self._caches.unusable}
            claim = None
            if peer in self._direct:
                claim = _Claim.of(self._caches, peer, request.block_ids, dest)
                if claim is not None:
                    header["claimed"] = claim.cache_id
            else:
                segment = self._pool.acquire(peer, dest.nbytes)
                header |= {"shm_name": segment.name, "shm_bytes": dest.nbytes,
                           "progress_bytes": progress_step(dest.nbytes)}
            with self._connections.exchange(peer, header, self._auth_token, timeout_s,
                                            claim.copy if claim else None) as (sock, reply):
                told = self._learn_local(peer, reply)
                if claim is not None and claim.holds(reply):
                    sock.sendall(_DONE)
                elif "runs" in reply:  # from a staging segment or the shared cache
                    self._copy_mapped(peer, sock, reply, dest)
                elif "cache" in reply:  # granted for the claim, whose copy failed
                    sock.sendall(_FAILED)
                    raise KVTransferError("the copy made before the reply failed")
                else:
                    if segment is None:
                        raise KVTransferError("the server no longer serves its cache")
                    filler = Filler(segment.buf, dest.views())
                    while "filled" in reply:  # a progress frame: copy out what is in
                        filler.fill_to(int(reply["filled"]))
                        reply = recv_ok(sock, f"pull of {request.transfer_id}")
                    filler.fill_to(dest.nbytes)  # the rest (all, if the server sent none)
            if told:  # dial the local listener from now on, not the TCP one kept idle
                self._connections.forget(peer)
            ok = True
            return dest.nbytes
        except (OSError, ValueError, KVTransferError) as e:
            self._caches.drop(peer)  # the server may be gone: do not pin its memory
            self._direct.discard(peer)
            raise KVTransferError(f"pull of {request.transfer_id} from {peer.host}:"
                                  f"{peer.port} by shm: {e}") from e
        finally:
            if segment is not None:  # not kept for a server that needs none
                self._pool.release(peer, segment, reusable=ok and peer not in self._direct)

    def _dial(self, peer: Peer, timeout_s: float) -> socket.socket:
        """A new connection to `peer`'s server: to its local listener if it named one that
        can be reached from here, else by TCP."""
        name = self._local.get(peer)
        if name is not None:
            try:
                return connect_local(name, timeout_s)
            except OSError as e:
                logger.info("KV server %s:%d's local listener is out of reach (%s): "
                            "dialling it by TCP", peer.host, peer.port, e)
                self._local.pop(peer, None)
        return connect(peer, timeout_s)

    def _learn_local(self, peer: Peer, reply: dict[str, Any]) -> bool:
        """Keep the local listener a reply names; whether it is news."""
        name = reply.get("local")
        if not isinstance(name, str) or self._local.get(peer) == name:
            return False
        self._local[peer] = name
        return True

    def _copy_mapped(self, peer: Peer, sock: socket.socket, reply: dict[str, Any],
                     dest: _Dest) -> None:
        """Copy the runs a reply names (in a staging segment, or the shared cache) into
        `dest`, then tell the server, which ends the lease either way."""
        try:
            if "staged" in reply:
                self._copy_staged(reply, dest.views())
            else:
                self._caches.copy_runs(peer, reply["cache"], reply["runs"], dest.spans())
                self._direct.add(peer)
        except BaseException:
            sock.sendall(_FAILED)  # ends the lease at once
            raise
        sock.sendall(_DONE)

    def _copy_staged(self, reply: dict[str, Any], dest_views: Sequence[memoryview]) -> None:
        """Copy a pull's runs out of the prefill's staging segment named in `reply`."""
        runs = [(int(o), int(n)) for o, n in reply.get("runs", [])]
        segment = self._attached.acquire(reply["staged"], max(
            (o + n for o, n in runs), default=0))
        try:
            if any(o < 0 or n < 0 for o, n in runs):
                raise KVTransferError(f"bad staged runs {runs[:4]}")
            copy_views([segment.buf[o:o + n] for o, n in runs], dest_views)
        finally:
            self._attached.release(segment)

    # --- prefill side ---------------------------------------------------------------------
    def serve_pull(self, sock: socket.socket, header: dict[str, Any],
                   request: PullRequest, source: KVSource) -> bool:
        try:
            where = where_mapped(header, request, source)
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return True
        if where is not None:
            return serve_mapped(sock, where | self._told(), request, source)
        try:
            segment = self._attached.acquire(header.get("shm_name"), header.get("shm_bytes"))
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return True
        try:
            views = source.views_for_pull(request)
        except KVTransferError as e:
            self._attached.release(segment)
            send_frame(sock, {"ok": False, "error": str(e)})
            return True
        ok = False
        try:
            try:
                error = fill_segment(segment, int(header["shm_bytes"]), views,
                                     progress_teller(sock, header.get("progress_bytes")))
            finally:
                self._attached.release(segment)  # before the reply: the client reuses it
            send_frame(sock, {"ok": error is None, "error": error} | self._told())
            ok = error is None
        except OSError as e:
            logger.warning("KV pull %s by shm failed: %s", request.transfer_id, e)
        finally:
            source.on_pull_done(request.transfer_id, ok)
        return ok

    def _told(self) -> dict[str, str]:
        """What a reply adds to name this server's local listener."""
        return {} if self._local_name is None else {"local": self._local_name}

    def served_locally_at(self, name: str) -> None:
        self._local_name = name

    def close(self) -> None:
        """Called at worker shutdown: unlink this worker's segments, drop the mappings of
        the others'."""
        self._pool.close()
        self._attached.close()
        self._connections.close()
        self._caches.close()
