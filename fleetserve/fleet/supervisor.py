"""Keeps a target number of replicas running behind a gateway: starts them, tells the
gateway when each is loading, up or gone, restarts one that exits (with backoff), gives up
on one that cannot start, grows and shrinks the fleet on request (`set_target`), and stops
them all on request.

A replica that dies mid-request is `mark_down` at once, so the gateway routes nothing new
to it; its streams migrate to the others on their own (their connections break).

A run *fails* when the replica cannot be launched (`backend.start` raises) or is gone
before it ever became ready (it exited, or did not get ready in `ready_timeout_s`). After
`max_failures` failed runs in a row the supervisor gives up on it (a model that can never
load must not restart forever): logged at error with the replica's last stderr lines,
state `failed` in the gateway (`/admin/replicas`, gauge `replica_failed`), and once every
replica has failed, `all_failed` is set. A replica that was ready and exits later is always
restarted; its backoff grows while it keeps dying young.

Scaling. Replica ids are `r0, r1, ...` in start order and never reused. Growing starts new
ids (or first takes back replicas still draining). Shrinking *drains* a replica: the gateway
gives it no new work and its streams finish there; past `drain_timeout_s` the gateway
*evicts* it: each remaining stream continues on another replica at its next event with the
token-exact migration (nothing lost or repeated, not counted as the replica's failure). Only
then, or `stop_grace_s` later for requests that cannot migrate (unary ones), is the process
stopped and the replica removed from the gateway. Evicting rather than stopping the process
first is what loses nothing: a stopped process breaks its streams at an arbitrary byte,
counts against nothing useful, and a backend whose stop is itself a graceful drain (SIGTERM,
a Kubernetes pod) would hold the streams for its own grace period instead of moving them.

A failed replica keeps its place in the target (a model that cannot load must not be retried
under a new id on every call); shrinking removes failed replicas first.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence

from fleetserve.fleet.backend import FleetBackend, ReplicaHandle
from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.replica import Replica

logger = logging.getLogger(__name__)

DEFAULT_MAX_FAILURES = 5
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DRAIN_POLL_S = 0.05  # how often a drain looks at the replica's requests in flight
# A line that says what went wrong: a log record at ERROR/CRITICAL, or an exception's last line.
_CAUSE = re.compile(r"\b(ERROR|CRITICAL)\b|^[\w.]*(Error|Exception)\b|^error:")


def replica_id(index: int) -> str:
    return f"r{index}"


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
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    ) -> None:
        """`num_replicas`: the target `start` sets. `drain_timeout_s`: how long a replica
        being scaled down keeps its streams before they are moved to other replicas."""
        if num_replicas < 0:
            raise ValueError(f"num_replicas must be >= 0, got {num_replicas}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
        self.backend = backend
        self.gateway = gateway
        self.num_replicas = num_replicas
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.max_failures = max_failures
        self.backoff = backoff
        self.drain_timeout_s = drain_timeout_s
        self.target = 0
        self.handles: dict[int, ReplicaHandle] = {}
        self.failed: dict[int, str] = {}  # replica index -> why the supervisor gave up
        self.all_failed = asyncio.Event()
        self.restarts = 0
        self.stopping = False
        # Invariant: every index in `_drains` or `failed` is in `_keepers`; an index leaves
        # `_keepers` only when its replica is removed. `_retired` ones are being stopped.
        self._keepers: dict[int, asyncio.Task] = {}  # index -> task that keeps it running
        self._drains: dict[int, asyncio.Task] = {}  # index -> task that drains and removes it
        self._retired: set[int] = set()
        self._next_index = 0

    def start(self) -> None:
        self.set_target(self.num_replicas, reason="start")

    # ---- scaling -----------------------------------------------------------------------------

    @property
    def serving(self) -> list[int]:
        """Indices of the replicas counted in the target: loading, ready or failed, not
        draining."""
        return [i for i in self._keepers if i not in self._drains]

    def replica_ids(self) -> list[str]:
        """Every replica it keeps: loading, ready, failed and draining ones."""
        return [replica_id(i) for i in self._keepers]

    def set_target(self, n: int, remove: Sequence[str] = (), *, reason: str = "manual") -> None:
        """Keep `n` replicas (loading + ready). Growing takes back draining replicas first,
        newest first, then starts new ids. Shrinking removes failed replicas first, then
        drains those named in `remove`, then the newest ready ones; never one still loading
        (fewer are drained then, and a later call does the rest). Idempotent: a replica
        already starting or draining is left alone. Must run on the gateway's loop."""
        if n < 0:
            raise ValueError(f"the target must be >= 0, got {n}")
        if self.stopping:
            return
        before = len(self.serving)
        self.target = n
        self.gateway.metrics.desired_replicas.set(n)
        if n > before:
            self._grow(n - before)
        elif n < before:
            self._shrink(before - n, remove)
        after = len(self.serving)
        if after != before:
            direction = "up" if after > before else "down"
            self.gateway.metrics.scale_events.labels(direction, reason).inc()
            logger.info("fleet: %d -> %d replicas (%s)", before, after, reason)

    def _grow(self, count: int) -> None:
        for index in sorted(self._drains, reverse=True)[:count]:
            if index in self._retired:
                continue  # its process is being stopped: too late to take it back
            self._drains.pop(index).cancel()
            self.gateway.set_draining(replica_id(index), False)
            if self._keepers[index].done():  # it exited while draining: start it again
                self._keepers[index] = self._keeper(index)
            logger.info("replica %s taken back into service", replica_id(index))
            count -= 1
        for _ in range(count):
            index = self._next_index
            self._next_index += 1
            self._keepers[index] = self._keeper(index)

    def _keeper(self, index: int) -> asyncio.Task:
        return asyncio.create_task(self._keep(index), name=f"replica-{replica_id(index)}")

    def _shrink(self, count: int, remove: Sequence[str]) -> None:
        for index in [i for i in self.serving if i in self.failed][:count]:
            self._forget(index)
            count -= 1
        for index in self._pick(count, remove):
            rid = replica_id(index)
            self.gateway.set_draining(rid, True)  # no new work from now on
            self._drains[index] = asyncio.create_task(self._drain(index), name=f"drain-{rid}")

    def _pick(self, count: int, remove: Sequence[str]) -> list[int]:
        """Up to `count` ready replicas to drain: those named first, then the newest."""
        ready = [i for i in self.serving if self._state(i) == "ready"]
        named = [i for i in ready if replica_id(i) in remove]
        for rid in set(remove) - {replica_id(i) for i in named}:
            logger.warning("replica %s is %s, not ready; not drained", rid, self._state_of(rid))
        others = sorted((i for i in ready if i not in named), reverse=True)
        picked = (named + others)[:count]
        if len(picked) < count:
            logger.info(
                "fleet: %d fewer replicas drained than asked (still loading)", count - len(picked)
            )
        return picked

    def _state(self, index: int) -> str:
        return self._state_of(replica_id(index))

    def _state_of(self, rid: str) -> str:
        replica = self.gateway.replicas.get(rid)
        return replica.state if replica is not None else "unknown"

    async def _drain(self, index: int) -> None:
        """Its streams finish, or move on past the drain deadline; then stop and remove it."""
        rid = replica_id(index)
        replica = self.gateway.replicas[rid]
        logger.info("replica %s draining (%d requests in flight)", rid, replica.outstanding)
        if not await self._idle(replica, self.drain_timeout_s):
            logger.info(
                "replica %s: drain deadline passed; moving its %d requests",
                rid,
                replica.outstanding,
            )
            self.gateway.evict(rid)
            await self._idle(replica, self.stop_grace_s)
        self._retired.add(index)
        handle = self.handles.get(index)
        if handle is not None:
            await self.backend.stop(handle, self.stop_grace_s)
        await asyncio.gather(self._keepers[index], return_exceptions=True)
        self._forget(index)
        logger.info("replica %s removed", rid)

    @staticmethod
    async def _idle(replica: Replica, timeout_s: float) -> bool:
        """Wait until `replica` has no request in flight from the gateway; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while replica.outstanding:
                    await asyncio.sleep(DRAIN_POLL_S)
            return True
        except TimeoutError:
            return False

    def _forget(self, index: int) -> None:
        self._keepers.pop(index).cancel()
        self._drains.pop(index, None)
        self._retired.discard(index)
        self.failed.pop(index, None)
        self.handles.pop(index, None)
        self.gateway.remove_replica(replica_id(index))

    # ---- one replica -------------------------------------------------------------------------

    async def _keep(self, index: int) -> None:
        rid = replica_id(index)
        backoff = self.backoff()
        failures = 0
        while not self._done(index):
            started = time.monotonic()
            handle, was_ready, what = await self._run_once(index)
            if self._done(index):
                return
            failures = 0 if was_ready else failures + 1
            if failures >= self.max_failures:
                self._give_up(index, handle, f"{what} ({failures} times in a row)")
                return
            delay = backoff.next_delay(time.monotonic() - started)
            self.restarts += 1
            logger.warning("replica %s %s; restarting in %.1fs", rid, what, delay)
            await asyncio.sleep(delay)  # restart backoff

    def _done(self, index: int) -> bool:
        """Whether replica `index` is not to be (re)started: the fleet stops, or the replica
        is being removed (an exit while draining ends the drain early)."""
        return self.stopping or index in self._retired or index in self._drains

    async def _run_once(self, index: int) -> tuple[ReplicaHandle | None, bool, str]:
        """Start replica `index` and wait until it is gone. Returns its handle (None if it
        could not be launched), whether it was ever ready, and what happened."""
        rid = replica_id(index)
        started = time.monotonic()
        try:
            handle = await self.backend.start(index)
        except Exception as exc:  # noqa: BLE001 - retried with backoff, then reported
            logger.exception("replica %s could not be started", rid)
            return None, False, f"could not be started ({type(exc).__name__}: {exc})"
        self.handles[index] = handle
        self.gateway.mark_loading(rid, handle.url, handle.pid)
        ready = await self.backend.wait_ready(handle, self.ready_timeout_s)
        if ready:
            if rid not in self.gateway.replicas:  # an operator removed it while it loaded
                self.gateway.mark_loading(rid, handle.url, handle.pid)
            self.gateway.mark_up(rid, handle.url, handle.pid)
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
        rid = replica_id(index)
        cause = failure_cause(handle.output_tail if handle is not None else ())
        reason = f"{what}; last error: {cause}" if cause else what
        logger.error("replica %s failed, giving up on it: %s", rid, reason)
        self.gateway.mark_failed(rid, handle.url if handle is not None else "", reason)
        self.failed[index] = reason
        serving = self.serving
        if serving and all(i in self.failed for i in serving):
            self.all_failed.set()

    async def stop(self) -> None:
        """Drain every replica, then stop them (SIGTERM, then SIGKILL after the grace)."""
        self.stopping = True
        for task in self._drains.values():
            task.cancel()
        for index in self.handles:
            rid = replica_id(index)
            if rid in self.gateway.replicas:
                self.gateway.set_draining(rid, True)
        await asyncio.gather(
            *(self.backend.stop(h, self.stop_grace_s) for h in self.handles.values()),
            return_exceptions=True,
        )
        tasks = [*self._keepers.values(), *self._drains.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def failure_cause(lines: Iterable[str], most: int = 3) -> str:
    """The lines of a replica's output that say why it failed (errors, an exception's last
    line), or its last lines when none does; joined with ' | '."""
    lines = [line.strip() for line in lines if line.strip()]
    causes = [line for line in lines if _CAUSE.search(line)] or lines
    return " | ".join(causes[-most:])
