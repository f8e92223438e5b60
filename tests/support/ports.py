"""Loopback ports for servers the tests start (and for addresses nobody answers on)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port that was free a moment ago: nothing listens on it until a test
    starts a server there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
