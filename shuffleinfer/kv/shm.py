"""The shm transport: same host only; block bytes go through a shared-memory segment.

The handshake is the tcp one over the same side channel; only the wire differs:
1. the decode side creates a segment in /dev/shm sized for the asked blocks and names it
   in the pull header ("shm_name", "shm_bytes");
2. the prefill server opens it, unlinks it (from then on only the two mappings keep it
   alive, so a crash on either side leaks nothing), grants the lease, copies the blocks
   in (one copy) and replies ok;
3. the decode side copies the segment into its own KV blocks (one copy).
The decode side unlinks the segment on every path too: a server that refused, died or
stalled before opening it leaves nothing behind in /dev/shm.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import socket
from collections.abc import Sequence
from typing import Any

from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.channel import connect, exchange, send_frame
from shuffleinfer.kv.tcp import pull_header
from shuffleinfer.kv.transport import KVSource, KVTransferError, Peer, PullRequest, Transport

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "shuffleinfer-kv-"
_NAME_RE = re.compile(rf"{SEGMENT_PREFIX}\d+-[0-9a-f]{{32}}")
# Pre-fault the whole mapping in one call: much cheaper than a page fault per 4 KiB.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class Segment:
    """A file in /dev/shm mapped read-write; `close()` unmaps, `unlink()` removes the name."""

    def __init__(self, name: str, fd: int, nbytes: int) -> None:
        self.name = name
        self.nbytes = nbytes
        try:
            # mmap cannot map 0 bytes; a 1-byte file stands in for an empty pull.
            self._map = mmap.mmap(fd, max(nbytes, 1), flags=_MAP_FLAGS)
        finally:
            os.close(fd)
        self.buf = memoryview(self._map)[:nbytes]

    @classmethod
    def create(cls, nbytes: int) -> Segment:
        """Called by the decode side before a pull: a new segment of `nbytes`."""
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            return cls(name, fd, nbytes)
        except BaseException:
            _unlink_quietly(path)
            raise

    @classmethod
    def attach(cls, name: object, nbytes: object) -> Segment:
        """Called by the prefill server with a pull header's (untrusted) fields: open the
        named segment, checking the name and the size. Raises KVTransferError."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise KVTransferError(f"bad shm segment name {name!r}")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise KVTransferError(f"bad shm segment size {nbytes!r}")
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise KVTransferError(f"cannot open shm segment {name} (not on this host?): "
                                  f"{e.strerror}") from e
        size = os.fstat(fd).st_size
        if size < max(nbytes, 1):
            os.close(fd)
            raise KVTransferError(f"shm segment {name} has {size} bytes, not {nbytes}")
        try:
            return cls(name, fd, nbytes)
        except OSError as e:  # e.g. out of address space or memory
            raise KVTransferError(f"cannot map shm segment {name}: {e}") from e

    def unlink(self) -> None:
        """Remove the segment's name (the mappings stay valid); fine if already gone."""
        _unlink_quietly(os.path.join(SHM_DIR, self.name))

    def close(self) -> None:
        """Unmap; the memory is freed once every mapping is closed and the name unlinked."""
        self.buf.release()
        self._map.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def copy_in(buf: memoryview, views: Sequence[memoryview]) -> int:
    """Copy `views` one after the other into `buf`; returns the bytes copied."""
    offset = 0
    for view in views:
        buf[offset:offset + len(view)] = view
        offset += len(view)
    return offset


def copy_out(buf: memoryview, views: Sequence[memoryview]) -> int:
    """Fill `views` one after the other from `buf`; returns the bytes copied."""
    offset = 0
    for view in views:
        view[:] = buf[offset:offset + len(view)]
        offset += len(view)
    return offset


def pull(host: str, port: int, request: PullRequest, dest_views: Sequence[memoryview],
         timeout_s: float, auth_token: str | None = None) -> int:
    """Pull the requested blocks into `dest_views` (same order) through a shared-memory
    segment; returns the bytes received. Raises KVTransferError naming the transfer on any
    failure; the segment is unlinked on every path."""
    nbytes = sum(len(v) for v in dest_views)
    segment: Segment | None = None
    try:
        segment = Segment.create(nbytes)
        header = pull_header(request, "shm") | {"shm_name": segment.name,
                                                "shm_bytes": nbytes}
        with connect(Peer(host, port), timeout_s) as sock:
            exchange(sock, header, auth_token)
        segment.unlink()
        return copy_out(segment.buf, dest_views)
    except (OSError, ValueError, KVTransferError) as e:
        raise KVTransferError(f"pull of {request.transfer_id} from {host}:{port} "
                              f"by shm: {e}") from e
    finally:
        if segment is not None:
            segment.unlink()
            segment.close()


class ShmTransport(Transport):
    """Bytes through /dev/shm: two memory copies, no socket traffic beyond the header.

    Each pull maps a fresh segment, so the kernel allocates and zeroes its pages and frees
    them afterwards; on this 2-core machine that costs more than the copies themselves
    (see `bench.py`), which is why shm measures slower than loopback tcp here."""

    name = "shm"

    def __init__(self, auth_token: str | None = None) -> None:
        self._auth_token = auth_token

    def pull(self, peer: Peer, request: PullRequest, kv: KVCacheViews,
             local_block_ids: tuple[int, ...], timeout_s: float) -> int:
        dest = kv.write_views(local_block_ids)
        nbytes = pull(peer.host, peer.port, request, dest.views, timeout_s,
                      auth_token=self._auth_token)
        dest.commit()
        return nbytes

    def serve_pull(self, sock: socket.socket, header: dict[str, Any],
                   request: PullRequest, source: KVSource) -> None:
        try:
            segment = Segment.attach(header.get("shm_name"), header.get("shm_bytes"))
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return
        try:
            segment.unlink()
            self._serve_into(sock, request, source, segment)
        finally:
            segment.close()

    @staticmethod
    def _serve_into(sock: socket.socket, request: PullRequest, source: KVSource,
                    segment: Segment) -> None:
        try:
            views = source.views_for_pull(request)
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return
        ok = False
        try:
            nbytes = sum(len(v) for v in views)
            if nbytes != segment.nbytes:
                send_frame(sock, {"ok": False, "error": f"shm segment has {segment.nbytes} "
                                                        f"bytes, the blocks {nbytes}"})
                return
            copy_in(segment.buf, views)
            send_frame(sock, {"ok": True, "error": None})
            ok = True
        except OSError as e:
            logger.warning("KV pull %s by shm failed: %s", request.transfer_id, e)
        finally:
            source.on_pull_done(request.transfer_id, ok)
