"""Shared-memory segments of the shm transport: files in /dev/shm that both sides map.

A new segment costs what the transport is meant to save: the kernel allocates and zeroes
its pages, and frees them afterwards (about 0.2 s for 256 MiB on a 2-core machine, more
than the copies). So segments live as long as the decode worker and serve many pulls:
- the decode side owns them. `SegmentPool` keeps up to `per_peer` idle segments for each
  prefill server, lends one to each pull (grown first if the pull needs more) and takes
  it back afterwards. A pull that failed gives its segment up (unlinked): the server may
  still be writing into it. `close()` at worker shutdown unlinks the rest.
- the prefill side attaches by name (`AttachedSegments`): it keeps its mapping between
  pulls and lets go of it once the owner has unlinked the name.
- a decode worker that dies without `close()` leaves its segments' names behind; its
  owner lock (an flock held for a segment's life) dies with it, and `sweep_orphans`, run
  when a worker starts, unlinks every segment whose lock is free.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import threading
from collections.abc import Hashable

from shuffleinfer.kv.errors import KVTransferError

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "shuffleinfer-kv-"
_NAME_RE = re.compile(rf"{SEGMENT_PREFIX}\d+-[0-9a-f]{{32}}")
# Pre-fault the whole mapping in one call: much cheaper than a page fault per 4 KiB.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_GROW_STEP = 1 << 20
"""Segments grow in whole MiB, so pulls of nearly equal size do not remap each time."""


class Segment:
    """A file in /dev/shm mapped read-write, its descriptor kept open (to grow the file,
    and to see whether its name is gone). `buf` is the whole mapping, `nbytes` long."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self._fd = fd
        self._map: mmap.mmap | None = None
        self.buf = memoryview(b"")
        self._map_file()

    def _map_file(self) -> None:
        size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, size, flags=_MAP_FLAGS)
        self.buf = memoryview(self._map)

    @property
    def nbytes(self) -> int:
        """Bytes mapped here."""
        return len(self.buf)

    @classmethod
    def create(cls, nbytes: int) -> Segment:
        """Called by the decode side (`SegmentPool`): a new segment of at least `nbytes`,
        owned by this process (flock held) until `close()`."""
        while True:
            name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
            path = os.path.join(SHM_DIR, name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(path, fd):
                    os.ftruncate(fd, max(nbytes, 1))  # mmap cannot map 0 bytes
                    return cls(name, fd)
            except BaseException:
                _unlink_quietly(path)
                os.close(fd)
                raise
            os.close(fd)  # a sweep took the name before we locked it: draw another

    @classmethod
    def attach(cls, name: object, nbytes: object) -> Segment:
        """Called by the prefill server with a pull header's (untrusted) fields: map the
        named segment, checking the name and that it holds `nbytes`. Raises
        KVTransferError."""
        name, nbytes = check_fields(name, nbytes)
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise KVTransferError(f"cannot open shm segment {name} (not on this host?): "
                                  f"{e.strerror}") from e
        try:
            segment = cls(name, fd)
        except (OSError, ValueError) as e:  # out of address space or memory; empty file
            os.close(fd)
            raise KVTransferError(f"cannot map shm segment {name}: {e}") from e
        try:
            segment.check_holds(nbytes)
        except KVTransferError:
            segment.close()
            raise
        return segment

    def check_holds(self, nbytes: int) -> None:
        """Raise KVTransferError unless both the file and this mapping hold `nbytes` (the
        server checks before each copy: touching a mapping past the file's end crashes)."""
        size = os.fstat(self._fd).st_size
        if min(size, self.nbytes) < nbytes:
            raise KVTransferError(f"shm segment {self.name} has {min(size, self.nbytes)} "
                                  f"bytes, not {nbytes}")

    def grow(self, nbytes: int) -> None:
        """Called by the owner before a pull that needs more than the segment holds:
        enlarge the file to `nbytes` and map it again (only the new pages are allocated)."""
        os.ftruncate(self._fd, nbytes)
        self._unmap()
        self._map_file()

    def is_unlinked(self) -> bool:
        """Whether the name is gone (the owner closed or gave up the segment)."""
        try:
            return os.fstat(self._fd).st_nlink == 0
        except OSError:
            return True

    def unlink(self) -> None:
        """Remove the segment's name (mappings stay valid); fine if already gone."""
        _unlink_quietly(os.path.join(SHM_DIR, self.name))

    def _unmap(self) -> None:
        self.buf.release()
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        """Unmap and close; the memory is freed once every mapping is closed and the name
        unlinked. Idempotent."""
        self._unmap()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def check_fields(name: object, nbytes: object) -> tuple[str, int]:
    """A pull header's segment name and size, or KVTransferError: only names this module
    mints are opened (no path tricks), and sizes are plain non-negative ints."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise KVTransferError(f"bad shm segment name {name!r}")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise KVTransferError(f"bad shm segment size {nbytes!r}")
    return name, nbytes


def _same_file(path: str, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def discard(segment: Segment) -> None:
    """Unlink and close a segment this process owns."""
    segment.unlink()
    segment.close()


def sweep_orphans() -> list[str]:
    """Called when a worker starts: unlink segments whose owner died without closing them
    (nobody holds their lock); returns their names. Live owners' segments are left alone,
    whatever process or container (sharing this /dev/shm) they belong to."""
    swept: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return swept
    for name in names:
        if not _NAME_RE.fullmatch(name):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(path, fd):
                _unlink_quietly(path)
                swept.append(name)
        except OSError:
            pass  # locked: its owner is alive
        finally:
            os.close(fd)
    if swept:
        logger.warning("unlinked %d shm segments left by dead workers", len(swept))
    return swept


class SegmentPool:
    """The decode side's segments, by prefill server, reused across pulls. Thread-safe.

    At most one pull uses a segment at a time: `acquire` lends an idle one (or a new one
    when all are busy) and `release` takes it back. At most `per_peer` idle segments are
    kept per server, so memory stays bounded by `per_peer` times the largest pull."""

    def __init__(self, per_peer: int = 1) -> None:
        self._per_peer = per_peer
        self._lock = threading.Lock()
        self._idle: dict[Hashable, list[Segment]] = {}
        self._closed = False

    def acquire(self, peer: Hashable, nbytes: int) -> Segment:
        """Called on a pull thread before the pull's header goes out: a segment of at
        least `nbytes` that no other pull uses until `release`. Raises OSError if /dev/shm
        is full, KVTransferError once closed."""
        with self._lock:
            if self._closed:
                raise KVTransferError("the shm transport is closed")
            idle = self._idle.get(peer, [])
            fitting = [s for s in idle if s.nbytes >= nbytes]
            segment = min(fitting, key=lambda s: s.nbytes) if fitting else \
                max(idle, key=lambda s: s.nbytes, default=None)
            if segment is not None:
                idle.remove(segment)
        size = -(-max(nbytes, 1) // _GROW_STEP) * _GROW_STEP
        if segment is None:
            return Segment.create(size)
        if segment.nbytes < nbytes:
            try:
                segment.grow(size)
            except BaseException:
                discard(segment)
                raise
        return segment

    def release(self, peer: Hashable, segment: Segment, reusable: bool) -> None:
        """Called once a pull ended: keep the segment for the next pull to `peer` if the
        pull succeeded (the server is done with it) and there is room; else unlink it."""
        with self._lock:
            idle = self._idle.setdefault(peer, [])
            keep = reusable and not self._closed and len(idle) < self._per_peer
            if keep:
                idle.append(segment)
        if not keep:
            discard(segment)

    def close(self) -> None:
        """Called at worker shutdown: unlink every idle segment now, busy ones when their
        pull releases them."""
        with self._lock:
            self._closed = True
            segments = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for segment in segments:
            discard(segment)


class AttachedSegments:
    """The prefill server's mappings of decode workers' segments, kept between pulls.

    `acquire` is called on a server thread for each shm pull, `release` once the blocks
    are in (before the reply: the client may reuse the segment as soon as it has it).
    A mapping whose name is gone is closed at the next `acquire`, or at `close()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mapped: dict[str, Segment] = {}
        self._in_use: set[str] = set()
        self._closed = False

    def acquire(self, name: object, nbytes: object) -> Segment:
        """The named segment, mapped with at least `nbytes`, for this pull alone. Raises
        KVTransferError for a bad name or size, or a segment already in use."""
        name, size = check_fields(name, nbytes)
        with self._lock:
            if self._closed:
                raise KVTransferError("the shm transport is closed")
            if name in self._in_use:
                raise KVTransferError(f"shm segment {name} is in use by another pull")
            self._in_use.add(name)
            segment = self._mapped.pop(name, None)
            stale = [n for n, s in self._mapped.items() if s.is_unlinked()]
            stale_segments = [self._mapped.pop(n) for n in stale]
        for old in stale_segments:
            old.close()
        try:
            if segment is not None and segment.nbytes < size:
                segment.close()  # the owner grew it: map it again
                segment = None
            if segment is None:
                segment = Segment.attach(name, size)
            segment.check_holds(size)
        except BaseException:
            if segment is not None:
                segment.close()
            with self._lock:
                self._in_use.discard(name)
            raise
        return segment

    def release(self, segment: Segment) -> None:
        """The pull is done with `segment`: keep the mapping for the next one."""
        with self._lock:
            self._in_use.discard(segment.name)
            keep = not self._closed
            if keep:
                self._mapped[segment.name] = segment
        if not keep:
            segment.close()

    def close(self) -> None:
        """Called at worker shutdown: close every mapping not in use (the rest on release)."""
        with self._lock:
            self._closed = True
            segments = list(self._mapped.values())
            self._mapped.clear()
        for segment in segments:
            segment.close()
