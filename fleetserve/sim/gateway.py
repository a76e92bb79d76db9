"""`SimGateway`: the gateway's decisions on the virtual clock, taken by the gateway's own
objects: `AdmissionController` (per-key limits), `Dispatcher` (router and policy, queue,
wait estimator, circuit breakers, held at zero) and each `Replica`'s `PrefixIndex` (fed
with the simulated engines' KV events, as `kv_events.py` feeds it over HTTP).

What the asyncio `Gateway` does around those objects is done here with events instead:
a queued ticket waits for a `Grant` or its expiry; a request ends with `release`; a stream
whose replica dies continues on another one with its prompt plus the tokens already sent
(token-exact migration), at most `max_migrations` times; a request that cannot be placed
again within `replica_wait_s` fails. Every stream ends exactly once (`SimStream.finish`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.bench.result import RequestResult
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.gateway.admission import AdmissionController
from fleetserve.gateway.api_keys import ANONYMOUS, ApiKey
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.dispatcher import (
    COLD_START,
    NO_REPLICA,
    Dispatcher,
    Grant,
    Outcome,
    Queued,
    Refused,
    Routed,
    Ticket,
)
from fleetserve.gateway.latency_window import LatencyWindow
from fleetserve.gateway.replica import Replica
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.sim.events import EventLoop
from fleetserve.sim.replica import SimReplica


@dataclass(eq=False)
class SimStream:
    """One request (one turn) from the client's send to its end. `result` is what the
    client saw, in the `fleetserve bench` format."""

    request_id: str
    result: RequestResult
    prompt_ids: list[int]
    max_tokens: int
    on_done: Callable[[SimStream], None]
    output_ids: list[int] = field(default_factory=list)
    replica: Replica | None = None
    routed_at: float = 0.0
    engine_id: str | None = None
    ticket: Ticket | None = None
    migrations: int = 0
    done: bool = False

    def finish(self, now: float, error: str | None = None, detail: str | None = None) -> None:
        assert not self.done, f"stream {self.request_id} ended twice"
        self.done = True
        self.result.end_s = now
        self.result.completion_tokens = len(self.output_ids)
        self.result.prompt_tokens = len(self.prompt_ids)
        if error is None and not self.output_ids:
            error, detail = "empty_output", "no token"
        self.result.error = error
        self.result.error_detail = detail
        self.on_done(self)


def _refusal_kind(refused: Refused) -> str:
    return "http_503" if refused.reason in (NO_REPLICA, COLD_START) else "http_429"


class SimGateway:
    def __init__(self, loop: EventLoop, config: GatewayConfig, key: ApiKey = ANONYMOUS) -> None:
        self.loop = loop
        self.config = config
        self.key = key
        self.admission = AdmissionController()
        self.dispatcher = Dispatcher(config)
        self.replicas: dict[str, Replica] = self.dispatcher.replicas
        self.engines: dict[str, SimReplica] = {}
        self._by_engine_id: dict[str, SimStream] = {}
        self._tickets: dict[Ticket, SimStream] = {}
        self._parked: list[tuple[SimStream, float]] = []  # migrations waiting for a replica
        self._attempts = itertools.count()
        self.recent_ttft = LatencyWindow()
        self.recent_itl = LatencyWindow()
        # Whether to fill the two windows above (only the autoscaler reads them; every
        # output token is a sample).
        self.track_latency = True
        self.turned_away = 0
        self.on_starved: Callable[[], None] | None = None
        self.on_replica_idle: Callable[[Replica], None] | None = None
        self.migrations = 0

    # ---- the replica table -------------------------------------------------------------

    def add_replica(self, engine: SimReplica, ready: bool) -> Replica:
        replica = Replica(engine.id, f"http://sim-{engine.id}", breaker_config=self.config.breaker)
        replica.ready = ready
        replica.loading = not ready
        replica.started_at = self.loop.now
        self.replicas[engine.id] = replica
        self.engines[engine.id] = engine
        if ready:
            self.changed()
        return replica

    def remove_replica(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)
        self.engines.pop(replica_id, None)

    def mark_ready(self, replica_id: str) -> None:
        """Its (re)start is over and a probe passed: a clean slate that takes work."""
        replica = self.replicas[replica_id]
        replica.ready, replica.loading, replica.down = True, False, False
        replica.breaker.reset()
        replica.prefix.clear()
        self.changed()

    def kill(self, replica_id: str) -> None:
        """Its process died: its engine restarts empty, and every stream on it moves."""
        replica = self.replicas[replica_id]
        engine = self.engines[replica_id]
        replica.down, replica.ready = True, False
        replica.prefix.clear()
        victims = [s for s in self._by_engine_id.values() if s.replica is replica]
        engine.restart()
        for stream in victims:
            self._detach(stream)
            self._release(replica, Outcome.FAILURE, stream)
            self._migrate(stream, replica_id)

    def evict(self, replica_id: str) -> None:
        """A draining replica past its deadline: its streams continue elsewhere."""
        replica = self.replicas[replica_id]
        engine = self.engines[replica_id]
        victims = [s for s in self._by_engine_id.values() if s.replica is replica]
        engine_ids = [s.engine_id for s in victims]
        for stream in victims:
            self._detach(stream)  # first: the aborts' outputs are not their ends
        engine.abort(engine_ids)
        for stream in victims:
            self._release(replica, Outcome.NEUTRAL, stream)
            self._migrate(stream, replica_id)

    def go_dark(self, detail: str) -> None:
        """The whole region is lost, this gateway with it: every replica dies, and every
        stream it holds (running, queued, or parked for a migration) ends now."""
        for replica_id, replica in self.replicas.items():
            replica.down, replica.ready = True, False
            replica.prefix.clear()
            self.engines[replica_id].restart()
        for stream in list(self._by_engine_id.values()):
            replica = stream.replica
            self._detach(stream)
            self._release(replica, Outcome.NEUTRAL, stream)
            self._end(stream, "connection_lost", detail)
        for ticket, stream in list(self._tickets.items()):
            self.dispatcher.withdraw(ticket)
            stream.ticket = None
            self._end(stream, "http_503", detail)
        self._tickets.clear()
        for stream, _ in self._parked:
            if not stream.done:
                self._end(stream, "connection_lost" if stream.output_ids else "http_503", detail)
        self._parked = []

    def changed(self) -> None:
        """A replica may have become usable: serve the queue and parked migrations."""
        self._hand_out(self.dispatcher.grant(self.loop.now))
        self._parked = [
            (stream, deadline)
            for stream, deadline in self._parked
            if not stream.done and not self._place_again(stream, frozenset())
        ]

    # ---- requests ----------------------------------------------------------------------

    def send(self, stream: SimStream) -> None:
        now = self.loop.now
        cost = len(stream.prompt_ids) + stream.max_tokens
        decision = self.admission.admit(self.key, cost, now)
        if not decision.admitted:
            stream.finish(now, "http_429", f"admission: {decision.reason}")
            return
        route = RouteRequest(
            stream.request_id,
            tuple(stream.prompt_ids),
            len(stream.prompt_ids),
            stream.max_tokens,
            self.key.priority_rank,
        )
        outcome = self.dispatcher.submit(route, None, now)
        if isinstance(outcome, Routed):
            self._dispatch(stream, outcome.replica)
        elif isinstance(outcome, Refused):
            if outcome.reason == COLD_START:
                self.turned_away += 1
                self._starved()
            self._end(stream, _refusal_kind(outcome), f"refused: {outcome.reason}")
        else:
            assert isinstance(outcome, Queued)
            stream.ticket = outcome.ticket
            self._tickets[outcome.ticket] = stream
            if outcome.displaced is not None:
                other = self._tickets.pop(outcome.displaced)
                other.ticket = None
                self._end(other, "http_429", "refused: displaced")
            self.loop.call_at(outcome.ticket.expires_at, self._expire, outcome.ticket)
            if not self.dispatcher.any_accepting(now):
                self._starved()

    def _starved(self) -> None:
        if self.on_starved is not None:
            self.on_starved()

    def _expire(self, ticket: Ticket) -> None:
        stream = self._tickets.pop(ticket, None)
        if stream is None:
            return  # granted meanwhile
        refused = self.dispatcher.expire(ticket, self.loop.now)
        stream.ticket = None
        self._end(stream, _refusal_kind(refused), f"refused: {refused.reason}")

    def _hand_out(self, grants: list[Grant]) -> None:
        for grant in grants:
            stream = self._tickets.pop(grant.ticket)
            stream.ticket = None
            self._dispatch(stream, grant.replica)

    def _dispatch(self, stream: SimStream, replica: Replica) -> None:
        """Send the stream (or its continuation) to `replica`, whose slot it holds."""
        now = self.loop.now
        stream.replica = replica
        stream.routed_at = now
        stream.engine_id = f"{stream.request_id}#{next(self._attempts)}"
        self._by_engine_id[stream.engine_id] = stream
        remaining = stream.max_tokens - len(stream.output_ids)
        request = EngineCoreRequest(
            stream.engine_id,
            stream.prompt_ids + stream.output_ids,
            SamplingParams(max_tokens=remaining, ignore_eos=True, temperature=0.0),
            arrival_time=now,
        )
        self.engines[replica.id].add_request(request)

    def _detach(self, stream: SimStream) -> None:
        self._by_engine_id.pop(stream.engine_id, None)
        stream.engine_id = None

    def _release(self, replica: Replica, outcome: Outcome, stream: SimStream) -> None:
        held = self.loop.now - stream.routed_at if outcome is Outcome.SUCCESS else None
        stream.replica = None
        grants = self.dispatcher.release(replica, outcome, self.loop.now, held, stream.request_id)
        self._hand_out(grants)
        if replica.draining and replica.outstanding == 0 and self.on_replica_idle:
            self.on_replica_idle(replica)

    def _migrate(self, stream: SimStream, failed_on: str) -> None:
        if stream.migrations >= self.config.max_migrations:
            self._end(stream, "connection_lost", "replica lost; out of migrations")
            return
        stream.migrations += 1
        self.migrations += 1
        if not self._place_again(stream, frozenset({failed_on})):
            # No replica accepts work: wait up to `replica_wait_s` for one (`changed`).
            deadline = self.loop.now + self.config.replica_wait_s
            self._parked.append((stream, deadline))
            self.loop.call_at(deadline, self._give_up, stream)
            self._starved()

    def _place_again(self, stream: SimStream, exclude: frozenset[str]) -> bool:
        """Route a continuation now, past the queue and the slot limit; False when no
        replica accepts work."""
        now = self.loop.now
        ids = stream.prompt_ids + stream.output_ids
        route = RouteRequest(
            stream.request_id,
            tuple(ids),
            len(ids),
            stream.max_tokens - len(stream.output_ids),
            self.key.priority_rank,
            exclude=exclude,
            needs_extensions=True,
        )
        replica = self.dispatcher.route_now(route, now)
        if replica is None:
            return False
        self._dispatch(stream, replica)
        return True

    def _give_up(self, stream: SimStream) -> None:
        if stream.done or stream.replica is not None:
            return
        self._parked = [(s, d) for s, d in self._parked if s is not stream]
        kind = "connection_lost" if stream.output_ids else "http_503"
        self._end(stream, kind, "no replica accepts work")

    def _end(self, stream: SimStream, error: str | None = None, detail: str | None = None):
        charged = len(stream.prompt_ids) + stream.max_tokens
        self.admission.release(self.key, charged, None, self.loop.now)
        stream.finish(self.loop.now, error, detail)

    # ---- what the engines say ----------------------------------------------------------

    def on_kv_events(self, engine: SimReplica, events: list) -> None:
        replica = self.replicas.get(engine.id)
        if replica is None:
            return
        replica.prefix.apply(
            {
                "block_size": engine.settings.block_size,
                "events": [{"kind": e.kind, "block_hashes": e.block_hashes} for e in events],
            }
        )

    def on_outputs(self, engine: SimReplica, outputs: list[EngineCoreOutput]) -> None:
        now = self.loop.now
        replica = self.replicas.get(engine.id)
        if replica is not None:
            load = replica.load
            load.running, load.waiting = engine.num_running, engine.num_waiting
            load.kv_cache_usage = engine.kv_cache_usage
        for out in outputs:
            stream = self._by_engine_id.get(out.request_id)
            if stream is None:
                continue
            if out.new_token_ids:
                chunks = stream.result.chunk_times_s
                if not chunks:
                    if self.track_latency:
                        self.recent_ttft.observe(now, now - stream.result.start_s)
                    stream.replica.prefilling.pop(stream.request_id, None)
                elif self.track_latency:
                    self.recent_itl.observe(now, now - chunks[-1])
                stream.output_ids.extend(out.new_token_ids)
                chunks.extend([now] * len(out.new_token_ids))
                stream.replica.last_progress = now
            if out.finished:
                self._detach(stream)
                replica = stream.replica
                if out.finish_reason == "error":
                    self._release(replica, Outcome.NEUTRAL, stream)
                    self._end(stream, "http_400", out.error)
                else:
                    self._release(replica, Outcome.SUCCESS, stream)
                    self._end(stream)
