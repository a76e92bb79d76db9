"""The local backend: each replica is a child process on this machine, in a process group
of its own (so that stopping it stops its engine core too), on a free loopback port, and
set to receive SIGTERM if this process dies first (Linux). Its stderr passes through to ours
line by line, and its last lines are kept on the handle (why did it die?)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

import httpx

from fleetserve.fleet.backend import FleetBackend, ReplicaHandle
from fleetserve.fleet.process import signal_group

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalBackend(FleetBackend):
    name = "local"

    def __init__(
        self,
        command: Callable[[int], list[str]],
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        health_headers: dict[str, str] | None = None,
    ) -> None:
        """`command(port)`: the argv of a replica listening on `port`."""
        self.command = command
        self.env = env
        self.host = host
        self.health_headers = health_headers or {}

    async def start(self, index: int) -> ReplicaHandle:
        port = free_port(self.host)
        argv = self.command(port)
        # Popen from the event-loop thread, not a worker: PDEATHSIG follows the thread that
        # forks. The preexec_fn only makes one async-signal-safe system call.
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            argv,
            env=self.env,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        logger.info("replica %d: pid %d on port %d", index, proc.pid, port)
        handle = ReplicaHandle(index, f"http://{self.host}:{port}", proc.pid, proc)
        threading.Thread(
            target=_pass_through,
            args=(proc.stderr, handle.output_tail),
            name=f"replica-{index}-stderr",
            daemon=True,
        ).start()
        return handle

    async def wait_ready(self, handle: ReplicaHandle, timeout_s: float) -> bool:
        proc: subprocess.Popen = handle.native
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0, headers=self.health_headers) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False
                try:
                    if (await client.get(f"{handle.url}/health")).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)  # poll interval while the model loads
        return False

    async def wait_exit(self, handle: ReplicaHandle) -> int | None:
        return await asyncio.to_thread(handle.native.wait)

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        proc: subprocess.Popen = handle.native
        if proc.poll() is not None:
            return
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), grace_s)
        except TimeoutError:
            logger.warning("replica %d did not stop in %.0fs; killing it", handle.index, grace_s)
        signal_group(proc.pid, signal.SIGKILL)  # its engine core too, whatever is left
        await asyncio.to_thread(proc.wait)


def _pass_through(stream: IO[bytes], tail: deque[str]) -> None:
    """Copy the replica's stderr to ours until it closes, keeping the last lines."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    with stream:
        for line in stream:
            tail.append(line.decode(errors="replace").rstrip())
            if out is not None:
                try:
                    out.write(line)
                    out.flush()
                except (OSError, ValueError):  # our stderr is gone; keep draining the pipe
                    out = None
