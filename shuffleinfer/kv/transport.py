"""The contract between the KV connector's worker half and the ways bytes move.

Every transport shares one side channel: TCP connections to the prefill worker's KV
server (or, for shm, a Unix socket it also listens on), each carrying framed JSON headers
and framed JSON replies (`channel.py`), kept open between pulls by tcp and shm
(`connections.py`). Only what
follows the header differs:
- tcp:  the reply, then the block bytes on the same socket;
- shm:  the decode side names a shared-memory segment in the header, the server copies
  the blocks into it, then replies;
- nccl: the reply, then the block bytes by NCCL send/recv between the two GPUs.

A `Transport` is one object per worker that plays both parts: `pull` on a decode worker's
pull thread, `serve_pull` on a prefill worker's KV server thread (every engine runs with
`kv_role="kv_both"`, so any worker may do either).
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from shuffleinfer.kv.errors import KVTransferError

if TYPE_CHECKING:
    import torch

    from shuffleinfer.kv.block_views import KVCacheViews
    from shuffleinfer.kv.staging import StagedRuns

TransportName = Literal["tcp", "shm", "nccl"]
TRANSPORT_NAMES: tuple[TransportName, ...] = ("tcp", "shm", "nccl")
TRANSPORT_CHOICES: tuple[str, ...] = ("auto", *TRANSPORT_NAMES)
"""Values of the `transport` key of `kv_connector_extra_config`."""


@dataclass(frozen=True)
class PullRequest:
    """What the decode side asks for; `layout` lets the server refuse a mismatch."""

    transfer_id: str
    block_ids: tuple[int, ...]
    layout: dict[str, Any]


@dataclass(frozen=True)
class Peer:
    """A prefill worker's KV server as a decode worker dials it."""

    host: str
    port: int


class KVSource(ABC):
    """What the KV server needs from the prefill worker (implemented by the worker half).

    `views_for_pull`, `rows_for_pull`, and `staged_for_pull` or `shared_for_pull` when
    they return a value, grant the lease: after that the server calls `on_pull_done`
    exactly once, whatever happens next.
    """

    @abstractmethod
    def views_for_pull(self, request: PullRequest) -> list[memoryview]:
        """Called on a server thread when a tcp or shm pull arrives: the blocks' bytes in
        host memory, layer by layer. Raises KVTransferError to refuse (lease untouched)."""

    def staged_for_pull(self, request: PullRequest) -> StagedRuns | None:
        """Called on a server thread when an shm pull that can read a staging segment
        arrives: grant the lease and say where its bytes sit staged (`staging.py`), or
        return None, lease untouched, if they are not staged (then `views_for_pull`).
        Raises KVTransferError to refuse (lease untouched)."""
        return None

    def shared_for_pull(self, request: PullRequest, claimed: str | None = None
                        ) -> tuple[dict[str, object], list[list[int]] | None] | None:
        """Called on a server thread when an shm pull that can map this worker's cache
        arrives: grant the lease and return how to map the cache and the pull's runs in
        it (`shared_cache.py`; runs None when the client already copies from this very
        cache, its id `claimed`), or None, lease untouched, if the cache is not shared.
        Raises KVTransferError to refuse (lease untouched)."""
        return None

    def rows_for_pull(self, request: PullRequest) -> list[torch.Tensor]:
        """Called on a server thread when an nccl pull arrives: each asked block of each
        layer as a 1-D uint8 tensor on the KV cache's device, in `views_for_pull` order.
        Raises KVTransferError to refuse (lease untouched)."""
        raise KVTransferError("this KV source serves no device tensors")

    @abstractmethod
    def on_pull_done(self, transfer_id: str, ok: bool) -> None:
        """Called after a granted pull's bytes went out (or failed to): end the lease."""

    @abstractmethod
    def on_release(self, transfer_id: str) -> None:
        """Called when a client releases a lease it will never pull."""

    @abstractmethod
    def on_unauthorized(self, client: str) -> None:
        """Called when a request without the shared `auth_token` was refused (to count it)."""


class Transport(ABC):
    """One way of moving a pull's bytes; both the decode and the prefill part."""

    name: ClassVar[TransportName]

    @abstractmethod
    def pull(self, peer: Peer, request: PullRequest, kv: KVCacheViews,
             local_block_ids: tuple[int, ...], timeout_s: float) -> int:
        """Called on a decode worker's pull thread, once per planned load: fill
        `local_block_ids` of `kv` with the peer's `request.block_ids` (same order) and
        return the bytes moved. Raises KVTransferError on any failure, within about
        `timeout_s` of silence from the peer; the local blocks are then undefined (vLLM
        recomputes them)."""

    @abstractmethod
    def serve_pull(self, sock: socket.socket, header: dict[str, Any],
                   request: PullRequest, source: KVSource) -> bool:
        """Called on a KV server thread for a pull header that passed the auth check:
        grant through `source`, move the bytes, reply on `sock`; return whether the
        connection is in step for another request (a refusal replied is; a pull that
        failed half-way is not). Errors are replied, never raised, except OSError from a
        dead socket (the server logs it)."""

    def serve_connect(self, sock: socket.socket, header: dict[str, Any]) -> None:
        """Called on a KV server thread for a `connect` header (a transport that needs a
        per-peer set-up, such as nccl's communicator). Others raise KVTransferError, which
        the server replies."""
        raise KVTransferError(f"transport {self.name} has no connect")

    def served_locally_at(self, name: str) -> None:
        """Called by the KV server that serves this transport with the name of its local
        listener (`channel.KVServer.local_name`), for replies that tell clients on the
        same host."""
        return None

    def close(self) -> None:
        """Called once at worker shutdown: free per-peer state."""
        return None
