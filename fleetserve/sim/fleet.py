"""`SimFleet`: replica lifecycle on the virtual clock: the starting set, injected failures,
and the autoscaler with cold starts.

The autoscaler is the fleet's own policy object (`Autoscaler.decide`), shown a
`FleetSnapshot` built as `fleet.controller.FleetController.snapshot` builds it, every
`interval_s` and at once when a request waits with nothing serving (the controller's
`poke`). Its decision is applied as the supervisor applies it: new replicas load for
`cold_start_s` and then take work (the measured start goes to the policy and to the
dispatcher's `cold_start_s`); removed ones drain, and past `drain_timeout_s` their streams
are migrated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from fleetserve.fleet.autoscaler import Autoscaler, FleetSnapshot, ReplicaSample
from fleetserve.fleet.scaling import policy_state
from fleetserve.gateway.replica import Replica
from fleetserve.sim.events import EventLoop
from fleetserve.sim.gateway import SimGateway
from fleetserve.sim.replica import SimReplica


@dataclass(frozen=True)
class Failure:
    """Replica `replica` (its index in the starting set) dies at `at_s` and is ready again
    `down_s` later, with an empty cache."""

    replica: int
    at_s: float
    down_s: float

    def __post_init__(self) -> None:
        if self.replica < 0 or self.at_s < 0 or self.down_s < 0:
            raise ValueError(f"a failure needs replica >= 0, at >= 0, down >= 0: {self}")

    @classmethod
    def parse(cls, text: str) -> Failure:
        """`REPLICA@AT_S+DOWN_S`, e.g. `0@30+10`: replica 0 dies at 30 s, back at 40 s."""
        try:
            replica, rest = text.split("@")
            at, down = rest.split("+")
            return cls(int(replica), float(at), float(down))
        except ValueError:
            raise ValueError(
                f"--fail {text!r}: expected REPLICA@AT_S+DOWN_S, e.g. 0@30+10"
            ) from None


class SimFleet:
    def __init__(
        self,
        loop: EventLoop,
        gateway: SimGateway,
        new_engine: Callable[[str], SimReplica],
        *,
        autoscaler: Autoscaler | None = None,
        interval_s: float = 1.0,
        cold_start_s: float = 30.0,
        drain_timeout_s: float = 30.0,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.loop = loop
        self.gateway = gateway
        self.new_engine = new_engine
        self.autoscaler = autoscaler
        self.interval_s = interval_s
        self.cold_start_s = cold_start_s
        self.drain_timeout_s = drain_timeout_s
        self.active = active
        self._ids = itertools.count()
        self.started: list[str] = []  # every replica id, in start order
        self.engines: dict[str, SimReplica] = {}  # every engine, kept for its statistics
        self.serving: list[str] = []  # loading or ready, not draining
        self.scale_events: list[dict] = []
        self.replica_seconds = 0.0  # replicas x virtual seconds they existed (cost)
        self._alive_since: dict[str, float] = {}
        self._decision_due = False
        gateway.on_replica_idle = self._drained
        if autoscaler is not None:
            gateway.on_starved = self.poke
            gateway.dispatcher.cold_start_s = cold_start_s

    def start(self, num_replicas: int) -> None:
        for _ in range(num_replicas):
            self._add(ready=True)
        if self.autoscaler is not None:
            self.loop.call_at(self.loop.now, self._tick)

    def _add(self, ready: bool) -> str:
        replica_id = f"r{next(self._ids)}"
        engine = self.engines[replica_id] = self.new_engine(replica_id)
        self.gateway.add_replica(engine, ready)
        self.started.append(replica_id)
        self.serving.append(replica_id)
        self._alive_since[replica_id] = self.loop.now
        if not ready:
            self.loop.call_later(self.cold_start_s, self._loaded, replica_id)
        return replica_id

    def _loaded(self, replica_id: str) -> None:
        if replica_id not in self.gateway.replicas:
            return
        self.gateway.mark_ready(replica_id)
        if self.autoscaler is not None:
            self.autoscaler.observe_cold_start(self.cold_start_s)
            self.gateway.dispatcher.cold_start_s = self.autoscaler.cold_start_s

    # ---- failures ----------------------------------------------------------------------

    def inject(self, failure: Failure) -> None:
        self.loop.call_at(failure.at_s, self._fail, failure)

    def _fail(self, failure: Failure) -> None:
        if failure.replica >= len(self.started):
            raise ValueError(f"--fail names replica {failure.replica}; the fleet has fewer")
        replica_id = self.started[failure.replica]
        if replica_id not in self.gateway.replicas:
            return  # scaled away before it could fail
        self.gateway.kill(replica_id)
        self.loop.call_later(failure.down_s, self._recover, replica_id)

    def _recover(self, replica_id: str) -> None:
        if replica_id in self.gateway.replicas:
            self.gateway.mark_ready(replica_id)

    # ---- autoscaling -------------------------------------------------------------------

    def poke(self) -> None:
        """A request waits and nothing serves: decide now, not at the next tick."""
        if not self.serving and not self._decision_due:
            self._decision_due = True
            self.loop.call_at(self.loop.now, self._decide)

    def _tick(self) -> None:
        self._decide()
        if self.active():
            self.loop.call_later(self.interval_s, self._tick)

    def snapshot(self, turned_away: int) -> FleetSnapshot:
        """What `FleetController.snapshot` would show the policy."""
        gw, now = self.gateway, self.loop.now
        samples = []
        for rid in self.serving + self._draining():
            replica = gw.replicas.get(rid)
            engine = gw.engines.get(rid)
            ready_engine = engine is not None and replica is not None and replica.ready
            samples.append(
                ReplicaSample(
                    id=rid,
                    state=policy_state(replica),
                    running=engine.num_running if ready_engine else 0,
                    waiting=engine.num_waiting if ready_engine else 0,
                    kv_cache_usage=engine.kv_cache_usage if ready_engine else 0.0,
                    started_at=(replica.started_at if replica else None) or now,
                )
            )
        return FleetSnapshot(
            now=now,
            replicas=tuple(samples),
            gateway_queued=len(gw.dispatcher.queue) + turned_away,
            gateway_in_flight=sum(r.outstanding for r in gw.replicas.values()),
            ttft_p90_s=gw.recent_ttft.quantile(now, 0.9),
            itl_p90_s=gw.recent_itl.quantile(now, 0.9),
        )

    def _draining(self) -> list[str]:
        return [rid for rid, r in self.gateway.replicas.items() if r.draining]

    def _decide(self) -> None:
        self._decision_due = False
        turned_away, self.gateway.turned_away = self.gateway.turned_away, 0
        decision = self.autoscaler.decide(self.snapshot(turned_away))
        current = len(self.serving)
        if decision.desired > current:
            for _ in range(decision.desired - current):
                self._add(ready=False)
            self._record("up", decision.reason, current)
        elif decision.desired < current:
            for rid in decision.remove[: current - decision.desired]:
                if rid in self.serving:
                    self._drain(rid)
            self._record("down", decision.reason, current)

    def _record(self, direction: str, reason: str, before: int) -> None:
        self.scale_events.append(
            {
                "t_s": self.loop.now,
                "direction": direction,
                "reason": reason,
                "from": before,
                "to": len(self.serving),
            }
        )

    def _drain(self, replica_id: str) -> None:
        self.serving.remove(replica_id)
        replica = self.gateway.replicas[replica_id]
        replica.draining = True
        if replica.outstanding == 0:
            self._drained(replica)
        else:
            self.loop.call_later(self.drain_timeout_s, self._evict, replica_id)

    def _evict(self, replica_id: str) -> None:
        replica = self.gateway.replicas.get(replica_id)
        if replica is not None and replica.outstanding:
            self.gateway.evict(replica_id)
            if replica.outstanding == 0:
                self._drained(replica)

    def _drained(self, replica: Replica) -> None:
        if replica.id in self.gateway.replicas:
            self.gateway.remove_replica(replica.id)
            self.replica_seconds += self.loop.now - self._alive_since.pop(replica.id)
            self.gateway.changed()

    def finish(self) -> None:
        """Close the replica-seconds account at the end of the run."""
        for since in self._alive_since.values():
            self.replica_seconds += self.loop.now - since
        self._alive_since.clear()
