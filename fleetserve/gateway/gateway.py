"""`Gateway`: the replica table and the asyncio shell around the `Dispatcher`.

The dispatcher decides (route now, queue, shed, grant on release); this shell does the
waiting: a queued request awaits a future that a later `release` or `notify_changed`
resolves. Retries and migrations skip the queue and the slot limit (`route_now`). Every
request ends with `release`. Background tasks per replica: the active prober and, for
fleetserve replicas, the KV-event subscriber (see `health` and `kv_events`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import httpx

from fleetserve.gateway.admission import AdmissionController
from fleetserve.gateway.api_keys import ApiKeyStore
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.context import RequestContext
from fleetserve.gateway.dispatcher import (
    COLD_START,
    DISPLACED,
    NO_REPLICA,
    Dispatcher,
    Grant,
    Outcome,
    Queued,
    Refused,
    Routed,
    Ticket,
)
from fleetserve.gateway.health import probe_loop
from fleetserve.gateway.kv_events import kv_event_loop
from fleetserve.gateway.latency_window import LatencyWindow
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.gateway.peers import poll_loop
from fleetserve.gateway.regional import Regions
from fleetserve.gateway.regional_config import RegionsConfig
from fleetserve.gateway.replica import Replica, ReplicaKind, ReplicaView
from fleetserve.gateway.retry_budget import RetryBudget
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.gateway.tokenizer import PromptTokenizer

__all__ = ["DeadlineExceeded", "Gateway", "NoReplica", "Outcome", "Shed"]

logger = logging.getLogger(__name__)


class Shed(Exception):
    """Refuse with 429 and this Retry-After."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class NoReplica(Exception):
    """No replica could take the request in time (503, with this Retry-After)."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's own deadline (X-Request-Timeout) passed before its first byte (504)."""


def _refusal(refused: Refused) -> Exception:
    if refused.reason == NO_REPLICA:
        return NoReplica("no replica became ready in time", max(refused.retry_after_s, 1.0))
    if refused.reason == COLD_START:
        return NoReplica(
            f"no replica is ready and the next one is expected in {refused.retry_after_s:.0f}s, "
            "after the request's deadline",
            refused.retry_after_s,
        )
    return Shed(refused.reason, refused.retry_after_s)


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        api_keys: ApiKeyStore | None = None,
        tokenizer: Any = None,
        clock: Callable[[], float] = time.monotonic,
        upstream_api_key: str | None = None,
        regions: RegionsConfig | None = None,
    ) -> None:
        """`api_keys`: None lets every client in and keeps the admin routes off.
        `upstream_api_key`: the internal key of the replicas this gateway was started with;
        sent (as a bearer token) only to replicas added with `trusted=True`. `regions`: this
        gateway's region and its peer regions (see `regional`); None: one region alone."""
        self.config = config
        self.api_keys = api_keys
        self.prompts: PromptTokenizer | None = None
        self.set_tokenizer(tokenizer)
        self.clock = clock
        self._internal_key = upstream_api_key
        self.admission = AdmissionController()
        self.retry_budget = RetryBudget(config.retry_budget_percent, config.retry_min_concurrency)
        self.dispatcher = Dispatcher(config)
        # The dispatcher's own objects, under the names the rest of the gateway reads.
        self.replicas: dict[str, Replica] = self.dispatcher.replicas
        self.router = self.dispatcher.router
        self.queue = self.dispatcher.queue
        self.waits = self.dispatcher.waits
        self._waiters: dict[Ticket, asyncio.Future[Replica]] = {}
        self.metrics = GatewayMetrics()
        self.metrics.watch_replicas(
            lambda: list(self.replicas.values()), clock, lambda: len(self.queue)
        )
        self.regions = Regions(regions, self.dispatcher) if regions is not None else None
        if self.regions is not None:
            self.metrics.watch_peers(lambda: list(self.regions.peers.values()))
        self.client: httpx.AsyncClient | None = None
        self._ids = itertools.count()
        self._tasks: dict[str, list[asyncio.Task]] = {}
        self._changed = asyncio.Event()  # set whenever a replica may have become usable
        self._wake: asyncio.TimerHandle | None = None  # at the next circuit's half-open
        self._wake_at = math.inf
        self._started = False
        # What clients felt lately (the autoscaler's SLO inputs); its controller sets the window.
        self.recent_ttft = LatencyWindow()
        self.recent_itl = LatencyWindow()
        # Hooks of the fleet's controller: a request waits with no replica accepting work
        # (scale from zero now, not at the next tick), and a replica's measured cold start.
        self.on_starved: Callable[[], None] | None = None
        self.on_cold_start: Callable[[float], None] | None = None
        # Requests refused because no replica would be ready by their deadline, since the
        # controller last looked: demand it must see although they are not queued.
        self.turned_away = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=self.config.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
        )
        self._started = True
        for replica in self.replicas.values():
            if replica.failed is None and not replica.down:
                self._start_tasks(replica)
        if self.regions is not None:
            self._start_polls(self.regions)

    async def stop(self) -> None:
        self._started = False
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        tasks = [t for ts in self._tasks.values() for t in ts]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Prompts are tokenized (prefix routing, exact migrated text) once this is set."""
        self.prompts = PromptTokenizer(tokenizer) if tokenizer is not None else None

    # ---- the replica table ---------------------------------------------------------------------

    def add_replica(
        self,
        url: str,
        kind: ReplicaKind = ReplicaKind.FLEETSERVE,
        pid: int | None = None,
        replica_id: str | None = None,
        *,
        trusted: bool = True,
        api_key: str | None = None,
        probe: bool = True,
    ) -> Replica:
        """Raises ValueError for a malformed URL or a taken id. `trusted`: the operator
        named or started this replica, so it gets the internal key (unless `api_key` is
        given); a replica added through the admin API is not. Either way it gets no work
        until an active probe passes. `probe=False`: not probed until `mark_up`."""
        replica_id = replica_id or f"r{next(self._ids)}"
        if replica_id in self.replicas:
            raise ValueError(f"replica id {replica_id!r} is taken")
        key = api_key or (self._internal_key if trusted else None)
        replica = Replica(replica_id, url, kind, pid, self.config.breaker)
        replica.auth_headers = {"Authorization": f"Bearer {key}"} if key else {}
        replica.accepts_priority = trusted and self.config.forward_priority
        self.replicas[replica_id] = replica
        if self._started and probe:
            self._start_tasks(replica)
        logger.info("replica %s added: %s (%s)", replica_id, replica.url, kind.value)
        return replica

    def remove_replica(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)
        for t in self._tasks.pop(replica_id, []):
            t.cancel()

    def mark_down(self, replica_id: str) -> None:
        """Its process is gone: no new work, and its mirrored cache is void."""
        replica = self.replicas.get(replica_id)
        if replica is not None:
            replica.down = True
            replica.ready = False
            replica.loading = False
            replica.prefix.clear()

    def mark_loading(self, replica_id: str, url: str, pid: int | None = None) -> None:
        """Its process was just (re)started and is loading: listed as `loading`, not
        probed and given no work until `mark_up`; its first passing probe after that ends
        the cold start (observed in `cold_start_seconds`)."""
        if replica_id not in self.replicas:
            self.add_replica(url, ReplicaKind.FLEETSERVE, pid, replica_id, probe=False)
        self.mark_down(replica_id)
        replica = self.replicas[replica_id]
        replica.url, replica.pid = url.rstrip("/"), pid
        replica.loading = True
        replica.started_at = self.clock()
        for t in self._tasks.pop(replica_id, []):
            t.cancel()

    def mark_up(self, replica_id: str, url: str, pid: int | None = None) -> None:
        """A (re)started process at `url`: clean slate; work flows once a probe passes."""
        replica = self.replicas[replica_id]
        replica.url, replica.pid = url.rstrip("/"), pid
        replica.down = False
        replica.breaker.reset()
        replica.prefix.clear()
        for t in self._tasks.pop(replica_id, []):
            t.cancel()
        if self._started:
            self._start_tasks(replica)

    def mark_failed(self, replica_id: str, url: str, reason: str) -> None:
        """Its supervisor gave up on it: listed with its `reason`, never probed or used."""
        if replica_id not in self.replicas:
            self.add_replica(url, replica_id=replica_id)
        self.mark_down(replica_id)
        self.replicas[replica_id].failed = reason
        for t in self._tasks.pop(replica_id, []):
            t.cancel()

    def set_draining(self, replica_id: str, draining: bool) -> None:
        """No new work for it (its streams finish there); `False` takes it back into
        service, and ends an eviction too."""
        replica = self.replicas[replica_id]
        replica.draining = draining
        if not draining:
            replica.evicting = False
        self.notify_changed()

    def evict(self, replica_id: str) -> None:
        """Move its streams: each continues on another replica at its next event, with
        the token-exact migration (see `StreamSession`). It must be draining already."""
        replica = self.replicas[replica_id]
        assert replica.draining, f"replica {replica_id} is evicted without draining first"
        replica.evicting = True

    def _start_tasks(self, replica: Replica) -> None:
        probe = probe_loop(
            replica,
            self.client,
            interval_s=self.config.probe_interval_s,
            timeout_s=self.config.probe_timeout_s,
            clock=self.clock,
            on_change=lambda: self._probed(replica),
        )
        tasks = [asyncio.create_task(probe, name=f"probe-{replica.id}")]
        if replica.supports_extensions:
            kv = kv_event_loop(replica, self.client)
            tasks.append(asyncio.create_task(kv, name=f"kv-{replica.id}"))
        self._tasks[replica.id] = tasks

    def _start_polls(self, regions: Regions) -> None:
        config = regions.config
        for peer in regions.peers.values():
            poll = poll_loop(
                peer,
                self.client,
                regions.peer_headers,
                interval_s=config.poll_interval_s,
                timeout_s=config.poll_timeout_s,
                clock=self.clock,
            )
            task = asyncio.create_task(poll, name=f"peer-{peer.name}")
            self._tasks[f"peer:{peer.name}"] = [task]

    def can_fail_over(self, spilled_from: str | None) -> bool:
        """Whether a request the local replicas cannot take may go to a peer region: its
        regional policy fails over, it did not come from a peer, and some peer can serve."""
        if (
            self.regions is None
            or spilled_from is not None
            or self.regions.config.policy == "local"
        ):
            return False
        return any(p.serving for p in self.regions.peers.values())

    def _probed(self, replica: Replica) -> None:
        if replica.loading and replica.ready:
            replica.loading = False
            if replica.started_at is not None:
                seconds = self.clock() - replica.started_at
                self.metrics.cold_start.observe(seconds)
                if self.on_cold_start is not None:
                    self.on_cold_start(seconds)
        self.notify_changed()

    def views(self, now: float) -> list[ReplicaView]:
        return self.dispatcher.views(now)

    def any_accepting(self) -> bool:
        return self.dispatcher.any_accepting(self.clock())

    def notify_changed(self) -> None:
        """A replica may have become usable: serve the queue, wake waiting retries."""
        now = self.clock()
        self._hand_out(self.dispatcher.grant(now))
        self._changed.set()
        self._hand_over_if_dark()
        self._wake_at_next_change(now)

    def _wake_at_next_change(self, now: float) -> None:
        """Requests are queued: serve them the moment a circuit's cooldown ends, not at the
        next probe an interval later (a ticket queued just after its replica's circuit
        opened, with a timeout equal to the cooldown, expired in that gap and was shed as
        if the fleet were busy)."""
        if not len(self.queue):
            return
        at = self.dispatcher.next_change(now)
        if at == math.inf or (self._wake is not None and self._wake_at <= at):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # driven without an event loop (a test's fake clock): probes suffice
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = at
        self._wake = loop.call_later(max(at - now, 0.0), self._woken)

    def _woken(self) -> None:
        self._wake = None
        self.notify_changed()

    def _hand_over_if_dark(self) -> None:
        """No replica here is up (ready and not down) and the autoscaler expects no cold
        start, but a peer region is healthy: the queued requests fail now (`NoReplica`), so
        that they go to the peer instead of waiting out their deadlines. A replica that its
        supervisor is restarting after a crash counts as dark here: its model load takes
        far longer than a peer's round trip."""
        if not len(self.queue) or not self.can_fail_over(None):
            return
        if self.dispatcher.cold_start_s is not None or self.any_accepting():
            return
        if any(r.ready and not r.down for r in self.replicas.values()):
            return  # up, its circuit open for a moment: not dark, its queue waits for it
        logger.warning("no replica accepts work: %d queued requests go to peers", len(self.queue))
        for ticket in self.queue.items():
            self._refuse(ticket, Refused(NO_REPLICA, 0.0))

    # ---- dispatch ----------------------------------------------------------------------------

    async def acquire(self, request: RouteRequest, deadline: float | None) -> Replica:
        """A slot for a fresh request. Raises `Shed` when the queue is full or the predicted
        wait passes the deadline, and when the deadline passes while it waits; `NoReplica`
        when no replica accepts work by then."""
        now = self.clock()
        if self.regions is not None:
            self.regions.submitted(request.request_id)
        decision = self.dispatcher.submit(request, deadline, now)
        if isinstance(decision, Routed):
            self._count(decision.replica)
            return decision.replica
        if isinstance(decision, Refused):
            if decision.reason == COLD_START:
                self.turned_away += 1
                self._starved()
            raise _refusal(decision)
        assert isinstance(decision, Queued)
        ticket = decision.ticket
        if decision.displaced is not None:
            self._refuse(decision.displaced, DISPLACED)
        if not self.any_accepting():
            self._starved()
        future = asyncio.get_running_loop().create_future()
        ticket.gone = future.done
        self._waiters[ticket] = future
        self._hand_over_if_dark()
        self._wake_at_next_change(now)
        granted = False
        try:
            async with asyncio.timeout(max(ticket.expires_at - now, 0.0)):
                replica = await future
            granted = True
            return replica
        except TimeoutError:
            if _granted(future):  # just as the deadline passed
                granted = True
                return future.result()
            raise _refusal(self.dispatcher.expire(ticket, self.clock())) from None
        finally:
            self.dispatcher.withdraw(ticket)
            del self._waiters[ticket]
            self.metrics.queue_wait.observe(self.clock() - now)
            if not granted and _granted(future):  # the waiter was cancelled
                self.release(future.result(), Outcome.NEUTRAL, None, request.request_id)

    def _starved(self) -> None:
        if self.on_starved is not None:
            self.on_starved()

    async def route_now(
        self, request: RouteRequest, deadline: float | None, fail_over: bool = False
    ) -> Replica:
        """A replica for a retry or a migration, waiting up to `replica_wait_s` (and the
        deadline) for one to accept work. Excluded replicas are used only as a last resort.
        `fail_over`: a peer region can take the request, so it does not wait for a local
        replica to come back (the caller fails over on `NoReplica`)."""
        limit = 0.0 if fail_over else self.config.replica_wait_s
        end = self.clock() + limit if deadline is None else min(self.clock() + limit, deadline)
        while True:
            replica = self.dispatcher.route_now(request, self.clock())
            if replica is not None:
                self._count(replica)
                return replica
            remaining = end - self.clock()
            if remaining <= 0:
                raise NoReplica("no replica accepts work")
            self._changed.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.25)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def _hand_out(self, grants: list[Grant]) -> None:
        for grant in grants:
            self._count(grant.replica)
            self._waiters[grant.ticket].set_result(grant.replica)

    def _refuse(self, ticket: Ticket, refused: Refused) -> None:
        future = self._waiters.get(ticket)
        if future is not None and not future.done():
            future.set_exception(_refusal(refused))

    def _count(self, replica: Replica) -> None:
        self.metrics.routed.labels(self.config.router, replica.id).inc()

    # ---- retries -----------------------------------------------------------------------------

    def request_started(self, ctx: RequestContext) -> None:
        """An admitted request is in flight (it counts towards the retry budget)."""
        self.retry_budget.request_started()

    def account(self, ctx: RequestContext, status: str, used: int | None) -> None:
        """A request ended with `status`: its key's admission is released (charged `used`
        tokens; None: the charge stands) and it is counted, once."""
        now = self.clock()
        self.admission.release(ctx.key, ctx.charged_tokens, used, now)
        self.metrics.e2e.observe(now - ctx.arrival)
        self.metrics.requests.labels(ctx.endpoint, status).inc()

    def request_ended(self, ctx: RequestContext) -> None:
        if ctx.retry_in_flight:
            ctx.retry_in_flight = False
            self.retry_budget.retry_ended()
        self.retry_budget.request_ended()

    def allow_retry(self, ctx: RequestContext) -> bool:
        """Whether `ctx` may try another replica now; its previous retry (if any) has
        ended. Counts the refusal in the metrics."""
        if ctx.retry_in_flight:
            ctx.retry_in_flight = False
            self.retry_budget.retry_ended()
        if self.retry_budget.try_start_retry():
            ctx.retry_in_flight = True
            return True
        self.metrics.retries_denied.inc()
        logger.info("request %s: retry denied by the retry budget", ctx.request_id)
        return False

    def prefill_done(self, replica: Replica, request_id: str) -> None:
        """The request's first token arrived: its prompt no longer weighs on the replica."""
        replica.prefilling.pop(request_id, None)

    def release(
        self,
        replica: Replica,
        outcome: Outcome,
        held_s: float | None = None,
        request_id: str | None = None,
    ) -> None:
        grants = self.dispatcher.release(replica, outcome, self.clock(), held_s, request_id)
        self._hand_out(grants)
        if outcome is Outcome.FAILURE:  # its breaker may have opened: the region may be dark
            self._hand_over_if_dark()


def _granted(future: asyncio.Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
