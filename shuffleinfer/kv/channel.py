"""The KV side channel: TCP connections to a prefill worker's KV server, each carrying
one request after another (decode sides keep them open between pulls, `connections.py`).

  client -> server: a framed JSON header {"op": "pull"|"release"|"connect",
                    "transport": "tcp"|"shm"|"nccl", "transfer_id", "auth_token", ...}
  server -> client: a framed JSON reply {"ok": bool, "error": str | None, ...}
The server listens on TCP and, for clients on its own host, on a Unix socket in the
abstract namespace under a random name (`KVServer.local_name`, told to clients by the shm
transport's replies): the same requests, with cheaper sends (on this VM a small frame's
send took about 25 us less than over TCP loopback).
What follows a pull's header depends on its transport (`transport.py`). With an
`auth_token` configured, the server refuses any header that does not carry the same one
before it looks at anything else, so a refused request never touches a lease.
"""

from __future__ import annotations

import functools
import hmac
import logging
import secrets
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgspec

from shuffleinfer.kv.transport import KVSource, KVTransferError, Peer, PullRequest, Transport

logger = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
_MAX_HEADER_BYTES = 1 << 20
_REPEATED_BYTES = 256
"""Frames up to this size are parsed once per distinct body (`_parse_repeated`)."""
AUTH_KEY = "auth_token"
_ENCODE, _DECODE = msgspec.json.Encoder().encode, msgspec.json.Decoder().decode


class PeerClosed(KVTransferError):
    """The peer closed the connection before all the bytes expected arrived."""


class Refused(KVTransferError):
    """The server replied, and said no (the connection is still usable)."""


def frame(obj: dict[str, Any]) -> bytes:
    """One length-prefixed JSON object, as sent. msgspec encodes in one C call: right
    after a pull's copy has swept the caches, json's encoder took about 110 us for a
    pull's header here, msgspec about 25 (on a one-block shm pull's critical path)."""
    data = _ENCODE(obj)
    return _LEN.pack(len(data)) + data


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Send one length-prefixed JSON object."""
    sock.sendall(frame(obj))


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket or raise if the peer closes first."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            raise PeerClosed(f"peer closed after {got} of {total} bytes")
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
    if length <= _REPEATED_BYTES:
        return dict(_parse_repeated(bytes(body)))
    return _parse(body)


def _parse(body: bytes | bytearray) -> dict[str, Any]:
    obj = _DECODE(body)
    if not isinstance(obj, dict):
        raise KVTransferError("header is not a JSON object")
    return obj


@functools.lru_cache(maxsize=128)
def _parse_repeated(body: bytes) -> dict[str, Any]:
    """A small frame's object, parsed once per distinct body: the frames on a pull's
    critical path repeat (a claim's grant, "done"), and right after a pull's copy has
    swept the caches, json's parser took about 65 us to read one here, a cached one
    about 10; msgspec's, which parses now, still took about 40 us for a pull's header
    with the caches swept. Callers get a shallow copy and must not change nested
    values."""
    return _parse(body)


def is_authorized(header: dict[str, Any], auth_token: str | None) -> bool:
    """Whether a header carries the server's shared secret (always, without one)."""
    if auth_token is None:
        return True
    given = header.get(AUTH_KEY)
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), auth_token.encode())


def parse_pull(header: dict[str, Any]) -> PullRequest:
    """A pull header's request; raises KVTransferError on a malformed one."""
    try:
        return PullRequest(str(header["transfer_id"]),
                           tuple(int(b) for b in header["block_ids"]),
                           dict(header.get("layout", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise KVTransferError(f"malformed pull header: {e!r}") from e


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        """Serve requests on one connection until the client closes it, it stays idle
        for the I/O timeout, or a request leaves the stream out of step."""
        server: _Serving = self.server  # type: ignore[assignment]
        sock: socket.socket = self.request
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Without a timeout a peer that stops reading would pin a served lease forever
        # (serving leases never expire): the send times out and the lease ends instead.
        sock.settimeout(server.io_timeout_s)
        client = f"{self.client_address[0]}:{self.client_address[1]}" \
            if isinstance(self.client_address, tuple) else "a local client"
        with server.tracking(sock):
            in_step = True
            while in_step:
                try:
                    header = recv_frame(sock)
                except (PeerClosed, TimeoutError):
                    return  # the client is done with it, or left it idle
                except (OSError, KVTransferError, ValueError) as e:
                    logger.warning("bad KV request from %s: %s", client, e)
                    return
                try:
                    in_step = self._dispatch(server, sock, header, client)
                except OSError as e:
                    logger.warning("KV %s of %s with %s failed: %s", header.get("op"),
                                   header.get("transfer_id"), client, e)
                    return

    @staticmethod
    def _dispatch(server: _Serving, sock: socket.socket, header: dict[str, Any],
                  client: str) -> bool:
        """Answer one request; whether the connection may carry another (not after a
        refused auth token, an nccl set-up, or a pull that failed half-way)."""
        if not is_authorized(header, server.auth_token):
            logger.warning("refused a KV %s from %s: missing or wrong auth token",
                           header.get("op"), client)
            server.source.on_unauthorized(client)
            send_frame(sock, {"ok": False, "error": "unauthorized: wrong or missing auth_token"})
            return False
        op = header.get("op")
        if op == "release":
            server.source.on_release(str(header.get("transfer_id", "")))
            send_frame(sock, {"ok": True, "error": None})
            return True
        name = header.get("transport", "tcp")
        transport = server.transports.get(name) if isinstance(name, str) else None
        if transport is None:
            send_frame(sock, {"ok": False, "error": f"transport {name!r} is not served here "
                                                    f"(serving {sorted(server.transports)})"})
            return True
        if op == "connect":
            try:
                transport.serve_connect(sock, header)
            except KVTransferError as e:
                send_frame(sock, {"ok": False, "error": str(e)})
            return False
        if op != "pull":
            send_frame(sock, {"ok": False, "error": f"unknown op {op!r}"})
            return True
        try:
            request = parse_pull(header)
        except KVTransferError as e:
            send_frame(sock, {"ok": False, "error": str(e)})
            return True
        return transport.serve_pull(sock, header, request, server.source)


class _Serving:
    """What both of a KV server's listeners (TCP and local) share."""

    daemon_threads = True
    source: KVSource
    transports: Mapping[str, Transport]
    io_timeout_s: float
    auth_token: str | None
    open_connections: set[socket.socket]
    connections_lock: threading.Lock

    @contextmanager
    def tracking(self, sock: socket.socket) -> Iterator[None]:
        """Count `sock` as open while its handler runs, so that close() can end it."""
        with self.connections_lock:
            self.open_connections.add(sock)
        try:
            yield
        finally:
            with self.connections_lock:
                self.open_connections.discard(sock)


class _Server(_Serving, socketserver.ThreadingTCPServer):
    allow_reuse_address = True


class _LocalServer(_Serving, socketserver.ThreadingUnixStreamServer):
    pass


class KVServer:
    """Serves pulls of leased blocks on a background thread, one thread per connection,
    each serving that connection's requests in turn.

    `io_timeout_s` bounds each socket operation of a connection, so a peer that stalls
    mid-transfer cannot hold a lease forever.
    """

    def __init__(self, host: str, port: int, source: KVSource,
                 transports: Mapping[str, Transport], io_timeout_s: float = 30.0,
                 auth_token: str | None = None) -> None:
        self._server = _Server((host, port), _Handler)
        self._servers: list[_Server | _LocalServer] = [self._server]
        self.local_name: str | None = f"shuffleinfer-kv-{secrets.token_hex(8)}"
        """The local listener's name in the abstract namespace (without its leading NUL:
        `connect_local`); random, so that no other process holds it first. None if this
        system has no such namespace: clients on this host then dial TCP."""
        try:
            self._servers.append(_LocalServer("\0" + self.local_name, _Handler))
        except OSError as e:
            logger.warning("KV server without a local listener (%s): same-host clients "
                           "dial it by TCP", e)
            self.local_name = None
        served = dict(transports)
        connections: set[socket.socket] = set()
        lock = threading.Lock()
        for server in self._servers:  # both listeners serve the same, tracked together
            server.source = source
            server.transports = served
            server.io_timeout_s = io_timeout_s
            server.auth_token = auth_token
            server.open_connections, server.connections_lock = connections, lock
        if self.local_name is not None:
            for transport in served.values():
                transport.served_locally_at(self.local_name)
        # A short poll interval only so that close() (engine shutdown) returns promptly.
        self._threads = [threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"shuffleinfer-kv-server-{i}", daemon=True)
            for i, server in enumerate(self._servers)]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def num_connections(self) -> int:
        """Connections open to this server now (idle ones kept by clients included)."""
        with self._server.connections_lock:
            return len(self._server.open_connections)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop accepting and end every open connection (idle ones included)."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        with self._server.connections_lock:
            open_connections = list(self._server.open_connections)
        for sock in open_connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its peer


def connect(peer: Peer, timeout_s: float) -> socket.socket:
    """A connected side-channel socket whose every operation times out after timeout_s."""
    sock = socket.create_connection((peer.host, peer.port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect_local(name: str, timeout_s: float) -> socket.socket:
    """A connection to the local listener of a KV server on this host (`KVServer.local_name`),
    every operation timing out after timeout_s; OSError if there is none by that name
    here (another network namespace has its own abstract names)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect("\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(sock: socket.socket, header: dict[str, Any], auth_token: str | None,
             while_waiting: Callable[[], None] | None = None) -> dict[str, Any]:
    """Send a header (with the auth token, if any), call `while_waiting` (if given) and
    return the server's ok reply.

    Raises KVTransferError with the server's reason if it refused."""
    if auth_token is not None:
        header = header | {AUTH_KEY: auth_token}
    send_frame(sock, header)
    if while_waiting is not None:
        while_waiting()
    return recv_ok(sock, f"{header.get('op')} of {header.get('transfer_id')}")


def recv_ok(sock: socket.socket, what: str) -> dict[str, Any]:
    """The server's next reply if it says ok; else KVTransferError with its reason."""
    reply = recv_frame(sock)
    if not reply.get("ok"):
        raise Refused(f"KV server refused {what}: {reply.get('error')}")
    return reply


def release(host: str, port: int, transfer_id: str, timeout_s: float = 5.0,
            auth_token: str | None = None) -> None:
    """Tell a prefill worker its lease will never be pulled, so it frees the blocks now."""
    try:
        with connect(Peer(host, port), timeout_s) as sock:
            exchange(sock, {"op": "release", "transfer_id": transfer_id}, auth_token)
    except (OSError, ValueError, KVTransferError) as e:
        raise KVTransferError(f"release of {transfer_id} at {host}:{port}: {e}") from e
