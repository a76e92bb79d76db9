"""Keeps N replicas running behind a gateway: starts them, tells the gateway when each is
up or gone, restarts one that exits (with backoff), and stops them all on request.

A replica that dies mid-request is `mark_down` at once, so the gateway routes nothing new
to it; its streams migrate to the others on their own (their connections break).
"""

from __future__ import annotations

import asyncio
import logging
import time

from fleetserve.fleet.backend import FleetBackend, ReplicaHandle
from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.replica import ReplicaKind

logger = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        backend: FleetBackend,
        gateway: Gateway,
        num_replicas: int,
        ready_timeout_s: float = 900.0,
        stop_grace_s: float = 30.0,
    ) -> None:
        if num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        self.backend = backend
        self.gateway = gateway
        self.num_replicas = num_replicas
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.handles: dict[int, ReplicaHandle] = {}
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
        backoff = RestartBackoff()
        while not self.stopping:
            handle = await self.backend.start(index)
            self.handles[index] = handle
            started = time.monotonic()
            if await self.backend.wait_ready(handle, self.ready_timeout_s):
                if rid in self.gateway.replicas:
                    self.gateway.mark_up(rid, handle.url, handle.pid)
                else:
                    self.gateway.add_replica(handle.url, ReplicaKind.FLEETSERVE, handle.pid, rid)
                logger.info("replica %s up at %s (pid %s)", rid, handle.url, handle.pid)
            elif not self.stopping:
                logger.error("replica %s did not become ready; stopping it", rid)
                await self.backend.stop(handle, 5.0)
            code = await self.backend.wait_exit(handle)
            self.gateway.mark_down(rid)
            if self.stopping:
                return
            delay = backoff.next_delay(time.monotonic() - started)
            self.restarts += 1
            logger.warning("replica %s exited (code %s); restarting in %.1fs", rid, code, delay)
            await asyncio.sleep(delay)  # restart backoff

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
