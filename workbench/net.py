"""Networking helpers for launching ranks (light: no torch)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (a rendezvous for a run's ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
