"""Side-channel connections kept open between pulls: one pool per decode-side transport.

A pull to a prefill's KV server takes an idle connection to it when there is one, so it
pays no connect and no new server thread, and it meets TCP buffers that earlier pulls
already grew (a fresh loopback connection moves its first megabytes about 1.5x slower).
The server serves request after request on one connection (`channel.py`) and closes a
connection that stays idle for its I/O timeout. Life of a connection:
1. `exchange` takes an idle one (dropping any idle longer than `idle_s`) or dials anew,
   sends the header, does what the caller has to do meanwhile (`while_waiting`, once)
   and reads the server's first reply;
2. a reused connection that turns out closed before that reply arrives (the server timed
   it out, or restarted) is replaced by a fresh one, once; the header can be sent again
   because a server that never replied never granted the lease;
3. the caller moves the bytes inside the `with`; leaving it normally gives the
   connection back (at most `per_peer` idle ones per server are kept, the rest closed),
   leaving it by an exception closes it, since its stream may be anywhere.
A refusal is a complete reply, so its connection goes back to the pool too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from shuffleinfer.kv.channel import PeerClosed, Refused, connect, exchange
from shuffleinfer.kv.transport import Peer

_STALE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, PeerClosed)
"""What a reused connection that the server had closed raises (not a timeout: a slow
server is not a closed one)."""


class ConnectionPool:
    """Idle side-channel connections per KV server; safe to share between pull threads."""

    def __init__(self, per_peer: int = 4, idle_s: float = 10.0,
                 dial: Callable[[Peer, float], socket.socket] = connect) -> None:
        """`per_peer` idle connections kept per server (0: a connection per pull);
        `idle_s`: how long one may sit idle before it is closed instead of reused;
        `dial`: how a new connection to a server is made (with a timeout)."""
        self._per_peer = per_peer
        self._dial = dial
        self._idle_s = idle_s
        self._idle: dict[Peer, list[tuple[float, socket.socket]]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def exchange(self, peer: Peer, header: dict[str, Any], auth_token: str | None,
                 timeout_s: float, while_waiting: Callable[[], None] | None = None
                 ) -> Iterator[tuple[socket.socket, dict[str, Any]]]:
        """A connection to `peer` that carried `header` (with the auth token) and the
        server's ok reply to it; `while_waiting` is called once, after the header first
        went out and before the reply is read. Raises `Refused` if the server said no,
        KVTransferError or OSError if it could not be reached."""
        pending = [while_waiting] if while_waiting is not None else []

        def once() -> None:
            while pending:
                pending.pop()()

        sock, reply = self._open(peer, header, auth_token, timeout_s, once)
        try:
            yield sock, reply
        except BaseException:
            sock.close()
            raise
        self._give_back(peer, sock)

    def _open(self, peer: Peer, header: dict[str, Any], auth_token: str | None,
              timeout_s: float, while_waiting: Callable[[], None]
              ) -> tuple[socket.socket, dict[str, Any]]:
        """An idle connection, or a new one if there is none or it turns out closed,
        that carried `header` and its ok reply."""
        sock = self._take(peer)
        if sock is not None:
            sock.settimeout(timeout_s)
            try:
                return sock, self._first_reply(peer, sock, header, auth_token,
                                               while_waiting)
            except _STALE:
                pass  # closed by the server; dial anew
        sock = self._dial(peer, timeout_s)
        return sock, self._first_reply(peer, sock, header, auth_token, while_waiting)

    def _first_reply(self, peer: Peer, sock: socket.socket, header: dict[str, Any],
                     auth_token: str | None, while_waiting: Callable[[], None]
                     ) -> dict[str, Any]:
        """Send `header` and read the reply; a refused connection goes back to the pool,
        a failed one is closed."""
        try:
            return exchange(sock, header, auth_token, while_waiting)
        except Refused:
            self._give_back(peer, sock)
            raise
        except BaseException:
            sock.close()
            raise

    def _take(self, peer: Peer) -> socket.socket | None:
        """The most recently used idle connection to `peer`, unless idle too long."""
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(peer, [])  # oldest first
            stale = 0
            while stale < len(idle) and now - idle[stale][0] > self._idle_s:
                stale += 1
            closing = [sock for _, sock in idle[:stale]]
            del idle[:stale]
            taken = idle.pop()[1] if idle else None
        for sock in closing:
            sock.close()
        return taken

    def _give_back(self, peer: Peer, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(peer, [])
            if len(idle) < self._per_peer:
                idle.append((time.monotonic(), sock))
                return
        sock.close()

    def forget(self, peer: Peer) -> None:
        """Close the idle connections to `peer`: its next pull dials anew."""
        with self._lock:
            idle = self._idle.pop(peer, [])
        for _, sock in idle:
            sock.close()

    def close(self) -> None:
        """Close every idle connection (at worker shutdown)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, sock in conns:
                sock.close()
