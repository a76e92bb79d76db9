"""The fleet's control loop: every `interval_s` it shows the autoscaling policy what the
gateway sees, and hands the policy's answer to the supervisor.

    gateway (replica states, their /metrics load, queue, in flight, recent TTFT/ITL)
        -> FleetSnapshot -> Autoscaler.decide -> ScaleDecision -> Supervisor.set_target

The policy is pure and the supervisor does the starting, draining and migrating; this file
is only the wiring, so that a simulator can run the same policy on a virtual clock and a
Ray or Kubernetes backend gets the same decisions.

Three hooks make scaling invisible to clients:

- *Activation.* At zero replicas a request is held in the gateway's queue (or, if its
  deadline is too soon, refused with 503 and counted); the gateway calls `poke` and the
  policy sees it at once (reason ``activate``), not a tick later.
- *Cold starts.* Each measured start-to-ready time goes to the policy (its cooldowns are never
  shorter) and to the gateway's dispatcher, which holds a request only when the expected cold
  start meets its deadline and otherwise answers 503 with that Retry-After. Before the first
  measurement it assumes `cold_start_estimate_s`.
- *Failed replicas keep their place.* A replica its supervisor gave up on (crash loop) is
  reported, not retried under a new id on every tick: the target passed to the supervisor is
  the policy's plus the failed ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fleetserve.fleet.autoscaler import Autoscaler, FleetSnapshot, ReplicaSample, ScaleDecision
from fleetserve.fleet.scaling import policy_state
from fleetserve.fleet.supervisor import Supervisor
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.latency_window import LatencyWindow

logger = logging.getLogger(__name__)


class FleetController:
    def __init__(
        self,
        gateway: Gateway,
        supervisor: Supervisor,
        policy: Autoscaler,
        *,
        interval_s: float = 1.0,
        cold_start_estimate_s: float = 30.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.gateway = gateway
        self.supervisor = supervisor
        self.policy = policy
        self.interval_s = interval_s
        self.clock = clock or gateway.clock
        self.last: ScaleDecision | None = None
        self._wake = asyncio.Event()
        window = policy.config.stable_window_s
        gateway.recent_ttft = LatencyWindow(window)
        gateway.recent_itl = LatencyWindow(window)
        gateway.dispatcher.cold_start_s = cold_start_estimate_s
        gateway.on_cold_start = self.observe_cold_start
        gateway.on_starved = self.poke

    def observe_cold_start(self, seconds: float) -> None:
        self.policy.observe_cold_start(seconds)
        self.gateway.dispatcher.cold_start_s = self.policy.cold_start_s

    def poke(self) -> None:
        """A request waits and no replica accepts work: decide now if the fleet is at zero
        (a replica that is already starting needs no new decision)."""
        if not self.supervisor.serving:
            self._wake.set()

    def snapshot(self, turned_away: int = 0) -> FleetSnapshot:
        """What the policy sees now. `turned_away`: requests refused at zero (their deadline
        was sooner than a cold start) since the last decision; they count as held ones, so
        that a fleet at zero starts a replica for them too."""
        gw, now = self.gateway, self.clock()
        samples = []
        for rid in self.supervisor.replica_ids():
            replica = gw.replicas.get(rid)
            state = policy_state(replica)
            running, waiting, kv = 0, 0, 0.0
            if replica is not None and state == "ready":
                load = replica.load
                running, waiting, kv = load.running, load.waiting, load.kv_cache_usage
            elif replica is not None and state == "draining":
                # What is still on it is what this gateway has there: its last /metrics
                # scrape may predate its streams moving away (counted twice, they scaled the
                # fleet straight back up).
                running = min(replica.load.running + replica.load.waiting, replica.outstanding)
            samples.append(
                ReplicaSample(
                    id=rid,
                    state=state,
                    running=running,
                    waiting=waiting,
                    kv_cache_usage=kv,
                    started_at=(replica.started_at if replica else None) or now,
                )
            )
        return FleetSnapshot(
            now=now,
            replicas=tuple(samples),
            gateway_queued=len(gw.queue) + turned_away,
            gateway_in_flight=sum(r.outstanding for r in gw.replicas.values()),
            ttft_p90_s=gw.recent_ttft.quantile(now, 0.9),
            itl_p90_s=gw.recent_itl.quantile(now, 0.9),
        )

    def tick(self) -> ScaleDecision:
        """One decision, applied."""
        turned_away, self.gateway.turned_away = self.gateway.turned_away, 0
        decision = self.policy.decide(self.snapshot(turned_away))
        failed = sum(1 for i in self.supervisor.serving if i in self.supervisor.failed)
        self.supervisor.set_target(
            decision.desired + failed, decision.remove, reason=decision.reason
        )
        self.last = decision
        return decision

    async def run(self) -> None:
        """Decide every `interval_s` (or at once when poked) until cancelled."""
        logger.info(
            "autoscaler on: %d..%d replicas, %.0f requests per replica",
            self.policy.config.min_replicas,
            self.policy.config.max_replicas,
            self.policy.config.target_concurrency,
        )
        while True:
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # a bug in a decision must not stop the fleet's scaling for good
                logger.exception("autoscaler decision failed")
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
