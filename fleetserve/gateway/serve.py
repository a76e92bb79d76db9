"""Running the gateway app under uvicorn, with our own signal handling: SIGTERM and SIGINT
stop the server (and whatever else the caller runs alongside) instead of killing the process
before its children are stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI

from fleetserve.http_limits import HttpLimits

logger = logging.getLogger(__name__)

T = TypeVar("T")


def quiet_http_client_logs() -> None:
    """httpx logs every request at INFO: far too much for a proxy."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are the caller's (see `serve_app`)


async def serve_app(
    app: FastAPI,
    sock: socket.socket,
    on_stop: Callable[[], None] | None = None,
    graceful_s: float = 10.0,
    stop: asyncio.Event | None = None,
    limits: HttpLimits | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (then `on_stop()` is called), until `stop` is set, or
    until cancelled. Requests in flight at that point get `graceful_s` to finish. `limits`:
    the door's head/body deadlines and size and connection limits (default: the defaults)."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(graceful_s),
        **(limits or HttpLimits()).uvicorn_kwargs(),
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def shut_down(why: str) -> None:
        logger.info("%s: shutting down", why)
        server.should_exit = True
        if on_stop is not None:
            on_stop()

    async def shut_down_when_set(event: asyncio.Event) -> None:
        await event.wait()
        shut_down("stop requested")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shut_down, sig.name)
    watcher = asyncio.create_task(shut_down_when_set(stop)) if stop is not None else None
    try:
        await server.serve(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the coroutine `main` on uvloop when it is installed; returns its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
