"""Keeps N replicas running behind a gateway: starts them, tells the gateway when each is
up or gone, restarts one that exits (with backoff), gives up on one that cannot start, and
stops them all on request.

A replica that dies mid-request is `mark_down` at once, so the gateway routes nothing new
to it; its streams migrate to the others on their own (their connections break).

A run *fails* when the replica cannot be launched (`backend.start` raises) or is gone
before it ever became ready (it exited, or did not get ready in `ready_timeout_s`). After
`max_failures` failed runs in a row the supervisor gives up on it (a model that can never
load must not restart forever): logged at error with the replica's last stderr lines,
state `failed` in the gateway (`/admin/replicas`, gauge `replica_failed`), and once every
replica has failed, `all_failed` is set. A replica that was ready and exits later is always
restarted; its backoff grows while it keeps dying young.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable

from fleetserve.fleet.backend import FleetBackend, ReplicaHandle
from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.replica import ReplicaKind

logger = logging.getLogger(__name__)

DEFAULT_MAX_FAILURES = 5
# A line that says what went wrong: a log record at ERROR/CRITICAL, or an exception's last line.
_CAUSE = re.compile(r"\b(ERROR|CRITICAL)\b|^[\w.]*(Error|Exception)\b|^error:")


class Supervisor:
    def __init__(
        self,
        backend: FleetBackend,
        gateway: Gateway,
        num_replicas: int,
        ready_timeout_s: float = 900.0,
        stop_grace_s: float = 30.0,
        max_failures: int = DEFAULT_MAX_FAILURES,
        backoff: Callable[[], RestartBackoff] = RestartBackoff,
    ) -> None:
        if num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        self.backend = backend
        self.gateway = gateway
        self.num_replicas = num_replicas
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.max_failures = max_failures
        self.backoff = backoff
        self.handles: dict[int, ReplicaHandle] = {}
        self.failed: dict[int, str] = {}  # replica index -> why the supervisor gave up
        self.all_failed = asyncio.Event()
        self.restarts = 0
        self.stopping = False
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep(i), name=f"replica-{i}")
            for i in range(self.num_replicas)
        ]

    async def _keep(self, index: int) -> None:
        rid = f"r{index}"
        backoff = self.backoff()
        failures = 0
        while not self.stopping:
            started = time.monotonic()
            handle, was_ready, what = await self._run_once(index)
            if self.stopping:
                return
            failures = 0 if was_ready else failures + 1
            if failures >= self.max_failures:
                self._give_up(index, handle, f"{what} ({failures} times in a row)")
                return
            delay = backoff.next_delay(time.monotonic() - started)
            self.restarts += 1
            logger.warning("replica %s %s; restarting in %.1fs", rid, what, delay)
            await asyncio.sleep(delay)  # restart backoff

    async def _run_once(self, index: int) -> tuple[ReplicaHandle | None, bool, str]:
        """Start replica `index` and wait until it is gone. Returns its handle (None if it
        could not be launched), whether it was ever ready, and what happened."""
        rid = f"r{index}"
        started = time.monotonic()
        try:
            handle = await self.backend.start(index)
        except Exception as exc:  # noqa: BLE001 - retried with backoff, then reported
            logger.exception("replica %s could not be started", rid)
            return None, False, f"could not be started ({type(exc).__name__}: {exc})"
        self.handles[index] = handle
        ready = await self.backend.wait_ready(handle, self.ready_timeout_s)
        if ready:
            if rid in self.gateway.replicas:
                self.gateway.mark_up(rid, handle.url, handle.pid)
            else:
                self.gateway.add_replica(handle.url, ReplicaKind.FLEETSERVE, handle.pid, rid)
            logger.info("replica %s up at %s (pid %s)", rid, handle.url, handle.pid)
        timed_out = not ready and time.monotonic() - started >= self.ready_timeout_s
        if not ready and not self.stopping:
            if timed_out:
                logger.error(
                    "replica %s is not ready after %.0fs; stopping it", rid, self.ready_timeout_s
                )
            await self.backend.stop(handle, 5.0)  # nothing to do if it exited already
        code = await self.backend.wait_exit(handle)
        self.gateway.mark_down(rid)
        if ready:
            return handle, True, f"exited (code {code})"
        if timed_out:
            return handle, False, f"was not ready within {self.ready_timeout_s:.0f}s"
        return handle, False, f"exited (code {code}) before it was ready"

    def _give_up(self, index: int, handle: ReplicaHandle | None, what: str) -> None:
        rid = f"r{index}"
        cause = failure_cause(handle.output_tail if handle is not None else ())
        reason = f"{what}; last error: {cause}" if cause else what
        logger.error("replica %s failed, giving up on it: %s", rid, reason)
        self.gateway.mark_failed(rid, handle.url if handle is not None else "", reason)
        self.failed[index] = reason
        if len(self.failed) == self.num_replicas:
            self.all_failed.set()

    async def stop(self) -> None:
        """Drain every replica, then stop them (SIGTERM, then SIGKILL after the grace)."""
        self.stopping = True
        for index in self.handles:
            rid = f"r{index}"
            if rid in self.gateway.replicas:
                self.gateway.set_draining(rid, True)
        await asyncio.gather(
            *(self.backend.stop(h, self.stop_grace_s) for h in self.handles.values()),
            return_exceptions=True,
        )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def failure_cause(lines: Iterable[str], most: int = 3) -> str:
    """The lines of a replica's output that say why it failed (errors, an exception's last
    line), or its last lines when none does; joined with ' | '."""
    lines = [line.strip() for line in lines if line.strip()]
    causes = [line for line in lines if _CAUSE.search(line)] or lines
    return " | ".join(causes[-most:])
