"""The nccl transport: GPU pairs; block bytes go by NCCL send/recv between the KV tensors.

Per (prefill, decode) pair, one 2-rank NCCL communicator (vLLM's `PyNcclCommunicator` on
a `StatelessProcessGroup`), set up lazily by the first pull:
1. the decode side sends a `connect` header over the side channel;
2. the prefill server binds a fresh port for the group's store, replies {"store_port",
   "pair_id"} and joins as rank 0; the decode side joins as rank 1 on that port; once the
   server has registered the pair it sends {"ready": true} on the same connection, and
   only then does the decode side use the pair (so a pull never outruns the set-up);
3. every later pull sends its header (with "nccl_pair") over TCP; after the ok reply the
   server sends each asked block of each layer straight out of its KV tensor and the
   decode side receives straight into its own (no host staging, no gather copy).
A pair is used by one pull at a time. A pull that times out aborts its communicator
(`ncclCommAbort` unblocks whatever waits on it); the next pull sets up a new pair.

vLLM's NCCL bindings are imported lazily, so this module imports on CPU-only machines.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shuffleinfer.kv.channel import connect, exchange, recv_frame, send_frame
from shuffleinfer.kv.tcp import pull_header
from shuffleinfer.kv.transport import KVSource, KVTransferError, Peer, PullRequest, Transport

if TYPE_CHECKING:
    import torch

    from shuffleinfer.kv.block_views import KVCacheViews

logger = logging.getLogger(__name__)

_GROUP_OPS = 256
"""Send/recv calls per ncclGroupStart/End; both sides use the same, so groups match."""
_SERVER_RANK, _CLIENT_RANK = 0, 1


@dataclass
class _Pair:
    """One side of a pair's communicator, with the stream its transfers run on."""

    pair_id: str
    comm: Any  # vllm PyNcclCommunicator
    stream: Any  # torch.cuda.Stream
    lock: threading.Lock = field(default_factory=threading.Lock)
    aborted: bool = False

    def abort(self) -> None:
        """Unblock and discard the communicator (after a timeout or at shutdown)."""
        self.aborted = True
        self.comm.destroy()


def _check_nccl() -> None:
    """Raise KVTransferError unless this process can load NCCL (both sides check before
    joining a pair, so neither waits for a peer that cannot come)."""
    try:
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

        NCCLLibrary()
    except Exception as e:  # noqa: BLE001 - any load failure means: no NCCL here
        raise KVTransferError(f"NCCL is not available in this process: {e}") from e


def _join(host: str, port: int, rank: int, device: torch.device, pair_id: str,
          timeout_s: float, listen_socket: socket.socket | None = None) -> _Pair:
    """Join a 2-rank group on `host:port` and build the communicator on `device`."""
    import torch
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=2,
                                         store_timeout=max(1, int(timeout_s)),
                                         listen_socket=listen_socket)
    comm = PyNcclCommunicator(group, device=device)
    if comm.disabled:
        raise KVTransferError("PyNccl disabled itself (VLLM_DISABLE_PYNCCL or no NCCL)")
    return _Pair(pair_id, comm, torch.cuda.Stream(device=device))


def _run_p2p(pair: _Pair, rows: list[torch.Tensor], send: bool, timeout_s: float) -> None:
    """Send (prefill side) or receive (decode side) every row, in order, and wait for the
    stream; on timeout abort the communicator (so nothing stays blocked) and raise."""
    import torch

    peer_rank = _CLIENT_RANK if send else _SERVER_RANK
    watchdog = threading.Timer(timeout_s, pair.abort)
    watchdog.daemon = True
    watchdog.start()  # ncclGroupEnd itself may block on a peer that is gone
    try:
        # Pull and server threads have no current device of their own: use the pair's.
        with torch.cuda.device(pair.stream.device):
            _issue_and_wait(pair, rows, send, peer_rank)
    finally:
        watchdog.cancel()
    if pair.aborted:
        raise KVTransferError(f"NCCL transfer timed out after {timeout_s} s; "
                              f"communicator {pair.pair_id} aborted")


def _issue_and_wait(pair: _Pair, rows: list[torch.Tensor], send: bool, peer_rank: int) -> None:
    """Issue the sends or receives in groups, then wait for the stream (or an abort)."""
    import torch

    for start in range(0, len(rows), _GROUP_OPS):
        if pair.aborted:
            return
        pair.comm.group_start()
        for row in rows[start:start + _GROUP_OPS]:
            if send:
                pair.comm.send(row, peer_rank, stream=pair.stream)
            else:
                pair.comm.recv(row, peer_rank, stream=pair.stream)
        pair.comm.group_end()
    done = torch.cuda.Event()
    done.record(pair.stream)
    while not done.query() and not pair.aborted:
        time.sleep(0.0002)


class NcclTransport(Transport):
    """GPU-to-GPU by NCCL, on any pair of hosts that NCCL can connect."""

    name = "nccl"

    def __init__(self, device: torch.device, bind_host: str,
                 auth_token: str | None = None, setup_timeout_s: float = 60.0) -> None:
        self._device = device
        self._bind_host = bind_host
        self._auth_token = auth_token
        self._setup_timeout_s = setup_timeout_s
        self._lock = threading.Lock()
        self._client_pairs: dict[Peer, _Pair] = {}
        self._client_setup: dict[Peer, threading.Lock] = {}
        self._server_pairs: dict[str, _Pair] = {}

    # --- decode side ----------------------------------------------------------------------
    def pull(self, peer: Peer, request: PullRequest, kv: KVCacheViews,
             local_block_ids: tuple[int, ...], timeout_s: float) -> int:
        if kv.device.type != "cuda":
            raise KVTransferError(f"nccl needs a KV cache on a CUDA device, not {kv.device}")
        pair = self._client_pair(peer)
        rows = kv.write_rows(local_block_ids)
        header = pull_header(request, "nccl") | {"nccl_pair": pair.pair_id}
        with pair.lock:
            try:
                with connect(peer, timeout_s) as sock:
                    exchange(sock, header, self._auth_token)
                _run_p2p(pair, rows, send=False, timeout_s=timeout_s)
            except (OSError, ValueError, KVTransferError) as e:
                # Refused (e.g. the server lost the pair) or timed out: start afresh next time.
                self._drop_client_pair(peer, pair)
                raise KVTransferError(f"pull of {request.transfer_id} from {peer.host}:"
                                      f"{peer.port} by nccl: {e}") from e
        return sum(int(r.numel()) for r in rows)

    def _client_pair(self, peer: Peer) -> _Pair:
        """The communicator with `peer`, set up on first use (one set-up per peer at once)."""
        with self._lock:
            setup = self._client_setup.setdefault(peer, threading.Lock())
        with setup:
            with self._lock:
                if (pair := self._client_pairs.get(peer)) is not None:
                    return pair
            _check_nccl()
            try:
                with connect(peer, self._setup_timeout_s) as sock:
                    reply = exchange(sock, {"op": "connect", "transport": "nccl"},
                                     self._auth_token)
                    pair = _join(peer.host, int(reply["store_port"]), _CLIENT_RANK,
                                 self._device, str(reply["pair_id"]), self._setup_timeout_s)
                    if not recv_frame(sock).get("ready"):
                        pair.abort()
                        raise KVTransferError("the server did not register the pair")
            except KVTransferError:
                raise
            except Exception as e:  # noqa: BLE001 - store, NCCL init, a malformed reply
                raise KVTransferError(f"nccl set-up with {peer.host}:{peer.port}: {e}") from e
            logger.info("NCCL pair %s with %s:%d ready", pair.pair_id, peer.host, peer.port)
            with self._lock:
                self._client_pairs[peer] = pair
            return pair

    def _drop_client_pair(self, peer: Peer, pair: _Pair) -> None:
        with self._lock:
            if self._client_pairs.get(peer) is pair:
                del self._client_pairs[peer]
        if not pair.aborted:
            pair.abort()

    # --- prefill side ---------------------------------------------------------------------
    def serve_connect(self, sock: socket.socket, header: dict[str, Any]) -> None:
        try:
            _check_nccl()
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return
        listener = socket.create_server((self._bind_host, 0))
        port = int(listener.getsockname()[1])
        pair_id = secrets.token_hex(8)
        try:
            send_frame(sock, {"ok": True, "error": None, "store_port": port,
                              "pair_id": pair_id})
            pair = _join(self._bind_host, port, _SERVER_RANK, self._device, pair_id,
                         self._setup_timeout_s, listen_socket=listener)
        except Exception as e:  # noqa: BLE001 - the client sees its own side fail
            listener.close()
            logger.warning("NCCL set-up of pair %s failed: %s", pair_id, e)
            return
        with self._lock:
            self._server_pairs[pair_id] = pair
        try:
            send_frame(sock, {"ok": True, "error": None, "ready": True})
        except OSError as e:
            logger.warning("NCCL pair %s: the client left during set-up: %s", pair_id, e)
            with self._lock:
                self._server_pairs.pop(pair_id, None)
            pair.abort()
            return
        logger.info("NCCL pair %s ready", pair_id)

    def serve_pull(self, sock: socket.socket, header: dict[str, Any],
                   request: PullRequest, source: KVSource) -> bool:
        # One pull per connection (the client closes it after the NCCL receive).
        with self._lock:
            pair = self._server_pairs.get(str(header.get("nccl_pair")))
        if pair is None:
            send_frame(sock, {"ok": False, "error": "unknown nccl pair: connect again"})
            return False
        try:
            rows = source.rows_for_pull(request)
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return False
        ok = False
        try:
            send_frame(sock, {"ok": True, "error": None})
            with pair.lock:
                _run_p2p(pair, rows, send=True, timeout_s=sock.gettimeout() or 30.0)
            ok = True
        except (OSError, KVTransferError) as e:
            logger.warning("KV pull %s by nccl failed: %s", request.transfer_id, e)
            with self._lock:
                self._server_pairs.pop(pair.pair_id, None)
            if not pair.aborted:
                pair.abort()
        finally:
            source.on_pull_done(request.transfer_id, ok)
        return False

    def close(self) -> None:
        with self._lock:
            pairs = [*self._client_pairs.values(), *self._server_pairs.values()]
            self._client_pairs.clear()
            self._server_pairs.clear()
        for pair in pairs:
            pair.abort()
