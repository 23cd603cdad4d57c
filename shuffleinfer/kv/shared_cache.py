"""A CPU engine's KV cache in shared memory, so that an shm pull copies only once.

Without this, an shm pull in whole mode copies twice: the prefill's KV server copies the
blocks into a segment, then the decode side copies them out. With the cache itself in
shared memory, the decode side copies the prefill's blocks straight into its own:
1. prefill side, once, when vLLM registers the cache (`SharedCache.share`): each backing
   allocation of the cache tensors (vLLM 0.32 makes one) moves into a shared-memory file
   in place, through torch's own `share_memory_` machinery: every view of it, the
   attention layers' included, then sees the new memory. The file is already unlinked;
   only the worker's descriptor names it, so nothing is ever left in /dev/shm. If
   /dev/shm is too small for it, the cache stays private and shm copies twice.
2. a pull: the server grants the lease and replies with the cache's regions (pid and
   descriptor) and the pull's byte runs in them; the decode side maps each region
   read-only through /proc/<pid>/fd/<fd> (`PeerCaches`, kept between pulls), copies the
   runs into its blocks, and says done; only then does the lease end, so the blocks
   cannot be reused under the copy. The cache's description also says where each
   layer's blocks lie (`describe_blocks`), so that a later pull can find its runs, and
   copy, before the reply comes (`PeerCaches.copy_claimed`, `shm._Claim`).
3. a decode side that cannot open the descriptor (another user, another pid namespace)
   fails that one pull (recomputed) and from then on asks that server for the two-copy
   path. A mapping is dropped when its server restarts (new cache id), when a pull to
   it fails, or after `idle_s` without pulls, so a dead prefill's memory is not pinned.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shuffleinfer.kv.block_views import block_spans
from shuffleinfer.kv.errors import KVTransferError
from shuffleinfer.kv.shm_segments import SHM_DIR
from shuffleinfer.kv.staging import pieces

logger = logging.getLogger(__name__)

_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def address_of(view: memoryview) -> int:
    """Where a host-memory view's first byte is."""
    return int(np.frombuffer(view, np.uint8).ctypes.data) if len(view) else 0


def copy_spans(src: Sequence[tuple[int, int]], dst: Sequence[tuple[int, int]]) -> int:
    """Copy the bytes at the (address, nbytes) spans `src`, one after the other, to the
    spans `dst`; both must hold the same number of bytes (else ValueError). memmove by
    address, without the GIL; the caller vouches that every span is mapped memory of
    this process and `dst` is writable."""
    src_sizes, dst_sizes = [n for _, n in src], [n for _, n in dst]
    if src_sizes == dst_sizes:  # span for span (the same stretches of blocks)
        for (s, n), (d, _) in zip(src, dst, strict=True):
            ctypes.memmove(d, s, n)
    else:
        for si, s_off, di, d_off, n in list(pieces(src_sizes, dst_sizes)):
            ctypes.memmove(dst[di][0] + d_off, src[si][0] + s_off, n)
    return sum(src_sizes)


@dataclass(frozen=True)
class _Region:
    base: int
    nbytes: int
    fd: int


class SharedCache:
    """Prefill side: the KV cache's backing memory, moved into shared-memory files."""

    def __init__(self, regions: list[_Region]) -> None:
        self._regions = sorted(regions, key=lambda r: r.base)
        self.cache_id = secrets.token_hex(8)
        self.described: dict[str, Any] = {
            "id": self.cache_id, "pid": os.getpid(),
            "regions": [[r.fd, r.nbytes] for r in self._regions]}
        """What a pull's reply says of the cache, for the decode side to map it."""

    @classmethod
    def share(cls, kv_caches: dict[str, torch.Tensor]) -> SharedCache | None:
        """Called once when vLLM registers its KV cache, before any view of its memory is
        taken (numpy views would keep the old address): move each distinct backing
        allocation of the CPU tensors into shared memory, in place. Returns None, cache
        untouched, when /dev/shm has not twice the cache's size free (a container's
        default is 64 MiB, and writing past a full tmpfs kills the process; twice leaves
        room for a second engine starting beside this one). Raises ValueError for
        tensors not on the CPU."""
        storages: dict[int, torch.UntypedStorage] = {}
        for name, tensor in kv_caches.items():
            if tensor.device.type != "cpu":
                raise ValueError(f"KV cache of {name} is on {tensor.device}, not the CPU")
            storage = tensor.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage)
        nbytes = sum(s.nbytes() for s in storages.values() if not s.is_shared())
        free = shm_free_bytes()
        if free < 2 * nbytes:
            logger.warning("the KV cache (%d MiB) stays private: %s has %d MiB free, less "
                           "than twice that; shm pulls copy twice", nbytes >> 20, SHM_DIR,
                           free >> 20)
            return None
        regions = []
        for storage in storages.values():
            fd, size = storage._share_fd_cpu_()  # moves it, unless already shared
            regions.append(_Region(storage.data_ptr(), int(size), int(fd)))
        return cls(regions)

    def describe_blocks(self, geometry: list[tuple[int, int, int]] | None) -> None:
        """Add where each layer's blocks lie (`KVCacheViews.block_geometry`: address of
        block 0, stride, block bytes) to `described`, as [region, offset, stride, bytes]
        per layer, so that a decode side that mapped the cache can find a pull's runs
        itself (`PeerCaches.copy_claimed`). Nothing is added for blocks of several runs."""
        if geometry is None:
            return
        layers = []
        for start, stride, size in geometry:
            index = self._region_of(start, 0)
            layers.append([index, start - self._regions[index].base, stride, size])
        self.described["layers"] = layers

    def runs(self, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
        """[region, offset, nbytes] for each (address, nbytes) of `spans` (parts of the
        cache), in order, neighbours in memory merged. Raises KVTransferError for a span
        outside the cache."""
        runs: list[list[int]] = []
        for start, nbytes in spans:
            index = self._region_of(start, nbytes)
            offset = start - self._regions[index].base
            last = runs[-1] if runs else None
            if last is not None and last[0] == index and last[1] + last[2] == offset:
                last[2] += nbytes
            else:
                runs.append([index, offset, nbytes])
        return runs

    def _region_of(self, start: int, nbytes: int) -> int:
        for index, region in enumerate(self._regions):
            if region.base <= start and start + nbytes <= region.base + region.nbytes:
                return index
        raise KVTransferError("a KV block lies outside the shared cache")


def shm_free_bytes() -> int:
    """Bytes free in /dev/shm (0 if it cannot be read)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class _Mapped:
    """One server's cache as this process maps it."""

    def __init__(self, described: dict[str, Any]) -> None:
        pid = int(described["pid"])
        self.maps: list[mmap.mmap] = []
        try:
            for fd, nbytes in described["regions"]:
                with open(f"/proc/{pid}/fd/{int(fd)}", "rb") as f:
                    self.maps.append(mmap.mmap(f.fileno(), int(nbytes), flags=_MAP_FLAGS,
                                               prot=mmap.PROT_READ))
        except BaseException:
            self.close()
            raise
        self.addresses = [address_of(memoryview(m)) for m in self.maps]
        self.cache_id = str(described["id"])
        self.blocks, self.capacity = self._blocks(described.get("layers"))
        self.used_at = time.monotonic()
        self.users = 0

    def _blocks(self, layers: object) -> tuple[list[tuple[int, int, int]] | None, int]:
        """Each layer's (address of block 0 here, stride, block bytes) from the server's
        per-layer [region, offset, stride, bytes], and how many blocks every layer holds
        within its mapping; (None, 0) if the server did not say or said it wrong (then
        no claims: every pull waits for the server's runs)."""
        if not isinstance(layers, list) or not layers:
            return None, 0
        found, capacity = [], None
        for layer in layers:
            if not (isinstance(layer, list) and len(layer) == 4
                    and all(isinstance(x, int) and x >= 0 for x in layer)
                    and layer[0] < len(self.maps) and layer[2] >= layer[3] > 0):
                return None, 0
            region, offset, stride, size = layer
            room = len(self.maps[region]) - offset - size
            fits = room // stride + 1 if room >= 0 else 0
            capacity = fits if capacity is None else min(capacity, fits)
            found.append((self.addresses[region] + offset, stride, size))
        return found, capacity or 0

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass  # a view of it is still alive; it unmaps when collected
        self.maps = []


class PeerCaches:
    """Decode side: the shared caches of the servers this worker pulls from, mapped."""

    def __init__(self, idle_s: float = 60.0) -> None:
        self._idle_s = idle_s
        self._mapped: dict[Hashable, _Mapped] = {}
        self.unusable: set[Hashable] = set()
        """Servers whose cache this process could not map: asked for two copies."""
        self._lock = threading.Lock()
        self._closed = False

    def copy_runs(self, peer: Hashable, described: dict[str, Any], runs: list[list[int]],
                  dest: Sequence[tuple[int, int]]) -> None:
        """Copy `runs` of `peer`'s cache (as its reply `described` it) to the (address,
        nbytes) spans `dest`, which must be writable memory of this process holding as
        many bytes. Raises KVTransferError if the cache cannot be mapped (the peer is
        then `unusable`) or the runs do not fit in it or do not fill `dest`."""
        mapped = self._acquire(peer, described)
        try:
            src = []
            for run in runs:
                region, offset, nbytes = (int(x) for x in run)
                if not (0 <= region < len(mapped.maps) and 0 <= offset and 0 <= nbytes
                        and offset + nbytes <= len(mapped.maps[region])):
                    raise KVTransferError(f"bad run {run} of the shared cache")
                src.append((mapped.addresses[region] + offset, nbytes))
            copy_spans(src, dest)
        except (TypeError, ValueError) as e:
            raise KVTransferError(f"bad runs of the shared cache: {e}") from e
        finally:
            self._let_go(mapped)

    def claimable(self, peer: Hashable) -> str | None:
        """The id of `peer`'s cache if it is mapped and its blocks can be found here
        (`copy_claimed`)."""
        with self._lock:
            mapped = self._mapped.get(peer)
            return None if mapped is None or mapped.blocks is None else mapped.cache_id

    def copy_claimed(self, peer: Hashable, block_ids: tuple[int, ...],
                     dest: Sequence[tuple[int, int]]) -> str | None:
        """For a pull that copies while its request is on the way (`shm._Claim`): copy the
        blocks `block_ids` of `peer`'s mapped cache, found from its block geometry, to
        the (address, nbytes) spans `dest`, writable memory of this process; returns the
        id of the cache copied from, or None (nothing copied) if it is not mapped, has
        no geometry, has no such blocks or they do not fill `dest`."""
        with self._lock:
            mapped = self._mapped.get(peer)
            if mapped is None or mapped.blocks is None or not block_ids \
                    or min(block_ids) < 0 or max(block_ids) >= mapped.capacity:
                return None
            mapped.users += 1
        try:
            copy_spans(block_spans(mapped.blocks, block_ids), dest)
            return mapped.cache_id
        except ValueError:
            return None
        finally:
            self._let_go(mapped)

    def _let_go(self, mapped: _Mapped) -> None:
        with self._lock:
            mapped.users -= 1
            mapped.used_at = time.monotonic()
            orphaned = self._closed and mapped.users == 0
        if orphaned:
            mapped.close()

    def _acquire(self, peer: Hashable, described: dict[str, Any]) -> _Mapped:
        closing = []
        with self._lock:
            now = time.monotonic()
            for key, m in list(self._mapped.items()):
                stale = key != peer and now - m.used_at > self._idle_s
                restarted = key == peer and m.cache_id != str(described.get("id"))
                if (stale or restarted) and m.users == 0:
                    closing.append(self._mapped.pop(key))
            mapped = self._mapped.get(peer)
            if mapped is not None:
                mapped.users += 1
        for m in closing:
            m.close()
        if mapped is not None:
            return mapped
        try:
            mapped = _Mapped(described)
        except (OSError, KeyError, TypeError, ValueError) as e:
            with self._lock:
                self.unusable.add(peer)
            logger.warning("cannot map the KV cache of %s (%s): its shm pulls copy twice "
                           "from now on", peer, e)
            raise KVTransferError(f"cannot map the peer's KV cache: {e}") from e
        with self._lock:
            kept = self._mapped.setdefault(peer, mapped)
            kept.users += 1
        if kept is not mapped:
            mapped.close()  # another pull mapped it meanwhile
        return kept

    def drop(self, peer: Hashable) -> None:
        """Unmap `peer`'s cache (a pull to it failed: it may be gone)."""
        with self._lock:
            mapped = self._mapped.get(peer)
            if mapped is None or mapped.users:
                return
            del self._mapped[peer]
        mapped.close()

    def close(self) -> None:
        """Unmap everything (at worker shutdown); a mapping a pull still copies from is
        unmapped when that copy ends (it copies by address: unmapping under it would
        crash the process)."""
        with self._lock:
            self._closed = True
            mapped, self._mapped = list(self._mapped.values()), {}
            idle = [m for m in mapped if m.users == 0]
        for m in idle:
            m.close()
