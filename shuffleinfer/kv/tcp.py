"""TCP wire for the KV hand-over: a pull server on the prefill side, a pull client on the
decode side.

One connection carries one request:
  client -> server: a framed JSON header {"op": "pull"|"release", "transfer_id", ...}
  server -> client: a framed JSON reply {"ok": bool, "error": str | None}
  then, for a successful pull, the raw bytes of every requested block, layer by layer in
  the order the client asked for. The client receives straight into its own KV blocks
  (`recv_into` on views of the cache), so nothing is copied beyond the socket buffers.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
_MAX_HEADER_BYTES = 1 << 20
_IOV_BATCH = 512


class KVTransferError(RuntimeError):
    """A pull or release failed; the caller recomputes or reports the failure."""


@dataclass(frozen=True)
class PullRequest:
    """What the decode side asks for; `layout` lets the server refuse a mismatch."""

    transfer_id: str
    block_ids: tuple[int, ...]
    layout: dict[str, Any]


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Send one length-prefixed JSON object."""
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket or raise if the peer closes first."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            raise KVTransferError(f"peer closed after {got} of {total} bytes")
        got += n


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Receive one length-prefixed JSON object."""
    head = bytearray(_LEN.size)
    recv_exact_into(sock, memoryview(head))
    (length,) = _LEN.unpack(head)
    if length > _MAX_HEADER_BYTES:
        raise KVTransferError(f"header of {length} bytes is too large")
    body = bytearray(length)
    recv_exact_into(sock, memoryview(body))
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise KVTransferError("header is not a JSON object")
    return obj


def send_views(sock: socket.socket, views: Sequence[memoryview]) -> int:
    """Send many buffers with scatter/gather writes; returns the bytes sent."""
    total = 0
    for start in range(0, len(views), _IOV_BATCH):
        batch = list(views[start : start + _IOV_BATCH])
        while batch:
            sent = sock.sendmsg(batch)
            total += sent
            while batch and sent >= len(batch[0]):
                sent -= len(batch[0])
                batch.pop(0)
            if batch and sent:
                batch[0] = batch[0][sent:]
    return total


class KVSource(ABC):
    """What the server needs from the prefill worker (implemented by the worker half)."""

    @abstractmethod
    def views_for_pull(self, request: PullRequest) -> list[memoryview]:
        """Called on a server thread when a pull arrives; raises KVTransferError to refuse."""

    @abstractmethod
    def on_pull_done(self, transfer_id: str, ok: bool) -> None:
        """Called after the bytes went out (or failed to): the lease can be released."""

    @abstractmethod
    def on_release(self, transfer_id: str) -> None:
        """Called when a client releases a lease it will never pull."""


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        source: KVSource = self.server.source  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Without a timeout a peer that stops reading would pin a served lease forever
        # (serving leases never expire): the send times out and the lease ends instead.
        sock.settimeout(self.server.io_timeout_s)  # type: ignore[attr-defined]
        try:
            header = recv_frame(sock)
        except (OSError, KVTransferError, ValueError) as e:
            logger.warning("bad KV request from %s: %s", self.client_address, e)
            return
        op = header.get("op")
        tid = str(header.get("transfer_id", ""))
        if op == "release":
            source.on_release(tid)
            send_frame(sock, {"ok": True, "error": None})
            return
        if op != "pull":
            send_frame(sock, {"ok": False, "error": f"unknown op {op!r}"})
            return
        try:
            request = PullRequest(tid, tuple(int(b) for b in header["block_ids"]),
                                  dict(header.get("layout", {})))
            views = source.views_for_pull(request)
        except (KVTransferError, KeyError, TypeError, ValueError) as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return
        ok = False
        try:
            send_frame(sock, {"ok": True, "error": None})
            send_views(sock, views)
            ok = True
        except OSError as e:
            logger.warning("KV pull %s to %s failed: %s", tid, self.client_address, e)
        finally:
            source.on_pull_done(tid, ok)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class KVServer:
    """Serves pulls of leased blocks on a background thread.

    `io_timeout_s` bounds each socket operation of a connection, so a peer that stalls
    mid-transfer cannot hold a lease forever.
    """

    def __init__(self, host: str, port: int, source: KVSource,
                 io_timeout_s: float = 30.0) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.source = source  # type: ignore[attr-defined]
        self._server.io_timeout_s = io_timeout_s  # type: ignore[attr-defined]
        # A short poll interval only so that close() (engine shutdown) returns promptly.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="shuffleinfer-kv-server", daemon=True,
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def pull(
    host: str,
    port: int,
    request: PullRequest,
    dest_views: Sequence[memoryview],
    timeout_s: float,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Pull the requested blocks into `dest_views` (same order); returns bytes received.

    Raises KVTransferError naming the transfer on any failure: refused, unreachable,
    timed out, or the server gone mid-transfer.
    """
    try:
        with _connect(host, port, timeout_s) as sock:
            send_frame(sock, {"op": "pull", "transfer_id": request.transfer_id,
                              "block_ids": list(request.block_ids), "layout": request.layout})
            reply = recv_frame(sock)
            if reply.get("ok"):
                total = 0
                for view in dest_views:
                    recv_exact_into(sock, view)
                    total += len(view)
                    if on_bytes is not None:
                        on_bytes(len(view))
                return total
    except (OSError, ValueError, KVTransferError) as e:
        # ValueError: a reply that is not JSON. Everything surfaces as one error type.
        raise KVTransferError(f"pull of {request.transfer_id} from {host}:{port}: {e}") from e
    raise KVTransferError(f"KV server refused {request.transfer_id}: {reply.get('error')}")


def release(host: str, port: int, transfer_id: str, timeout_s: float = 5.0) -> None:
    """Tell a prefill worker its lease will never be pulled, so it frees the blocks now."""
    try:
        with _connect(host, port, timeout_s) as sock:
            send_frame(sock, {"op": "release", "transfer_id": transfer_id})
            recv_frame(sock)
    except (OSError, ValueError, KVTransferError) as e:
        raise KVTransferError(f"release of {transfer_id} at {host}:{port}: {e}") from e
