"""Run the app on uvicorn, with fleetserve's shutdown rules: SIGTERM drains (503 to new
work, in-flight requests finish, exit 0); a dead engine exits 1; Ctrl+C stops at once."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from fleetserve.server.app import build_app
from fleetserve.server.state import ServerSettings

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5.0  # after the drain, for responses still being written


class ReplicaServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def request_exit(self, code: int) -> None:
        self.exit_code = max(self.exit_code, code)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's handler, the signal is not re-raised after shutdown: a drained
        # replica exits 0.
        state = getattr(self.config.app.state, "server", None) if self.started else None
        if sig == signal.SIGTERM and state is not None and not self.should_exit:
            self.loop.call_soon_threadsafe(state.begin_drain)
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(
    settings: ServerSettings,
    sock: socket.socket,
    on_ready: Callable[[], None] | None = None,
    log_level: str = "info",
    app_factory: Callable[..., Any] = build_app,
) -> int:
    """Serve until drained or stopped; returns the process exit code. `app_factory`: the
    replica's app (the LLM server's, or the tensor server's with its own settings)."""
    server: ReplicaServer | None = None

    def request_exit(code: int) -> None:
        server.request_exit(code)

    app = app_factory(settings, on_ready=on_ready, request_exit=request_exit)
    config = uvicorn.Config(
        app,
        log_level=log_level.lower(),
        log_config=None,  # the root logger's format (set by `fleetserve`) for uvicorn's lines too
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **settings.http.uvicorn_kwargs(),
    )
    server = ReplicaServer(config)
    server.run(sockets=[sock])
    return server.exit_code
