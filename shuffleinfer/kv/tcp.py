"""The tcp transport: block bytes follow the reply on the side-channel socket itself.
The decode side keeps its connections open between pulls (`connections.py`).

Works between any two hosts. The client receives straight into its own KV blocks
(`recv_into` on views of the cache) and the server sends straight from its blocks
(`sendmsg` of views), so on CPU nothing is copied beyond the socket buffers.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from shuffleinfer.kv.block_views import KVCacheViews
from shuffleinfer.kv.channel import frame, recv_exact_into, send_frame
from shuffleinfer.kv.connections import ConnectionPool
from shuffleinfer.kv.transport import KVSource, KVTransferError, Peer, PullRequest, Transport

logger = logging.getLogger(__name__)

_IOV_BATCH = 512


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


def pull_header(request: PullRequest, transport: str) -> dict[str, Any]:
    """The side-channel header of a pull by `transport`."""
    return {"op": "pull", "transport": transport, "transfer_id": request.transfer_id,
            "block_ids": list(request.block_ids), "layout": request.layout}


def pull(
    host: str,
    port: int,
    request: PullRequest,
    dest_views: Sequence[memoryview],
    timeout_s: float,
    on_bytes: Callable[[int], None] | None = None,
    auth_token: str | None = None,
    connections: ConnectionPool | None = None,
) -> int:
    """Pull the requested blocks into `dest_views` (same order); returns bytes received.
    `connections`: where to find an open connection to the server and give it back
    (default: a connection of its own, closed after).

    Raises KVTransferError naming the transfer on any failure: refused, unreachable,
    timed out, or the server gone mid-transfer.
    """
    pool = connections if connections is not None else ConnectionPool(per_peer=0)
    try:
        with pool.exchange(Peer(host, port), pull_header(request, "tcp"), auth_token,
                           timeout_s) as (sock, _):
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


class TcpTransport(Transport):
    """Bytes over the side-channel socket; any pair of hosts, CPU or staged accelerator."""

    name = "tcp"

    def __init__(self, auth_token: str | None = None) -> None:
        self._auth_token = auth_token
        self._connections = ConnectionPool()

    def pull(self, peer: Peer, request: PullRequest, kv: KVCacheViews,
             local_block_ids: tuple[int, ...], timeout_s: float) -> int:
        dest = kv.write_views(local_block_ids)
        nbytes = pull(peer.host, peer.port, request, dest.views, timeout_s,
                      auth_token=self._auth_token, connections=self._connections)
        dest.commit()
        return nbytes

    def serve_pull(self, sock: socket.socket, header: dict[str, Any],
                   request: PullRequest, source: KVSource) -> bool:
        try:
            views = source.views_for_pull(request)
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return True
        ok = False
        try:
            # The reply and the bytes in one scatter/gather write: one wake-up of the client.
            send_views(sock, [memoryview(frame({"ok": True, "error": None})), *views])
            ok = True
        except OSError as e:
            logger.warning("KV pull %s by tcp failed: %s", request.transfer_id, e)
        finally:
            source.on_pull_done(request.transfer_id, ok)
        return ok

    def close(self) -> None:
        self._connections.close()
