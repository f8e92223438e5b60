"""What `seat-sync status` asks the fleet's Redis: jobs queued and Polar calls spent in the
current rate window, over one bare RESP connection.

Two read-only commands do not need a Redis client library: loading redis-py (and asyncio,
arq) costs more CPU than the whole rest of a read of the mirror. Every URL form the
settings accept is spoken here (redis://, rediss:// with the default certificate checks,
unix://, a user and password, a database number); a URL with other options is left to
the full client (`None` here).
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The keys the worker writes (tests pin them to worker.queue and worker.polar.budget).
QUEUE_KEY = "seat-sync:queue"
BUDGET_LOG_KEY = "seat-sync:budget:log"
TIMEOUT_S = 1.0


class RedisReplyError(Exception):
    """Redis answered a command with an error."""


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")

    def call(self, *args: str | int) -> Any:
        parts = [str(a).encode() for a in args]
        frame = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self._sock.sendall(frame)
        return self._reply()

    def _reply(self) -> Any:
        line = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            raise RedisReplyError(body.decode())
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            return None if size < 0 else self._reader.read(size + 2)[:-2].decode()
        if kind == b"*":
            size = int(body)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise ConnectionError(f"unexpected reply from Redis: {line[:20]!r}")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


def _connect(url: str) -> tuple[_Connection, int] | None:
    """A connection (authenticated) and the database number; None for URL options this
    does not speak."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if set(query) - {"db"}:
        return None
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT_S)
        sock.connect(unquote(parts.path))
        db = int(query.get("db", ["0"])[0])
    elif parts.scheme in ("redis", "rediss"):
        sock = socket.create_connection(
            (parts.hostname or "localhost", parts.port or 6379), timeout=TIMEOUT_S
        )
        if parts.scheme == "rediss":
            import ssl

            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=parts.hostname or "localhost")
        path = parts.path.strip("/")
        db = int(path) if path else int(query.get("db", ["0"])[0])
    else:
        return None
    conn = _Connection(sock)
    try:
        if parts.password is not None:
            credentials = [unquote(parts.password)]
            if parts.username:
                credentials.insert(0, unquote(parts.username))
            conn.call("AUTH", *credentials)
        if db:
            conn.call("SELECT", db)
    except BaseException:
        conn.close()
        raise
    return conn, db


def figures(url: str, window_ms: int) -> tuple[int, int] | None:
    """(jobs queued, Polar calls in the last `window_ms`), read-only; None when the URL has
    options this does not speak. OSError (unreachable, timeout) and RedisReplyError pass."""
    opened = _connect(url)
    if opened is None:
        return None
    conn, _ = opened
    try:
        queued = int(conn.call("ZCARD", QUEUE_KEY))
        seconds, micros = conn.call("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        # The budget's own count: calls logged within the window (it trims older ones).
        used = int(conn.call("ZCOUNT", BUDGET_LOG_KEY, f"({now_ms - window_ms}", "+inf"))
        return queued, used
    finally:
        conn.close()
