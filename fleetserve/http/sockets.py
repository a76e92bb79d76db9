"""The listening socket of a server, bound before anything slow starts."""

from __future__ import annotations

import socket

BACKLOG = 2048  # connections wait here until uvicorn accepts them


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen now, so that port 0 resolves to a real port before the server starts
    and clients that connect early wait instead of being refused. Inheritable: a child
    process may serve it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock
