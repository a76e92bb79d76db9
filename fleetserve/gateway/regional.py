"""`Regions`: a regional gateway's own region and its peers, as the regional policy
(`fleetserve.regions.policy`) sees them. No I/O here: the peers' polls (`peers.poll_loop`)
and the spilled requests (`spill`) are run by the gateway, which asks this object where each
request goes.

The local region's view comes from the dispatcher: the wait a fresh request would have for
a replica slot now (`Dispatcher.predicted_wait`, 0 while a slot is free), and the longest
prefix of the prompt that a local replica has cached (the replicas' KV events). A peer's
comes from its last report, corrected by what this gateway sent it since (`Peer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection

from fleetserve.gateway.dispatcher import Dispatcher
from fleetserve.gateway.peers import Peer, RegionReport
from fleetserve.gateway.regional_config import RegionsConfig
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.regions.policy import (
    REGIONAL_POLICIES,
    RegionalPolicy,
    RegionChoice,
    RegionRequest,
    RegionView,
)

ARRIVING_TTL_S = 1.0


class Regions:
    def __init__(self, config: RegionsConfig, dispatcher: Dispatcher) -> None:
        self.config = config
        self.name = config.region
        self.dispatcher = dispatcher
        self.policy: RegionalPolicy = REGIONAL_POLICIES.get(config.policy)(config.policy_config)
        self.peers: dict[str, Peer] = {p.name: Peer(p, config) for p in config.peers}
        # Requests decided local and not yet submitted to the dispatcher (route request id ->
        # when): in a burst, many are decided before the first of them queues, and each must
        # see those before it. Forgotten after a second in any case (a client that left).
        self._arriving: dict[str, float] = {}
        # Sent to peers: the shared secret (the state route, spilled requests).
        self.peer_headers = (
            {"Authorization": f"Bearer {config.peer_key}"} if config.peer_key else {}
        )

    def report(self, now: float) -> RegionReport:
        """This region, for its peers' polls."""
        d = self.dispatcher
        views = d.views(now)
        wait = d.predicted_wait(now)
        block_sizes = sorted({v.prefix.block_size for v in views if v.prefix.block_size})
        return RegionReport(
            region=self.name,
            can_serve=math.isfinite(wait),
            predicted_wait_s=wait,
            replicas=sum(1 for v in views if v.accepting),
            slots=d.router.total_slots(views),
            free_slots=d.router.free_slots(views),
            queue_length=len(d.queue),
            mean_service_s=d.waits.mean_service_s,
            # one block size across the region, or none: a peer's hashes must match them all
            block_size=block_sizes[0] if len(block_sizes) == 1 else None,
        )

    def submitted(self, request_id: str) -> None:
        """The request reached the dispatcher (it counts in its queue or slots now)."""
        self._arriving.pop(request_id, None)

    def _count_arriving(self, now: float) -> int:
        stale = [rid for rid, at in self._arriving.items() if now - at > ARRIVING_TTL_S]
        for rid in stale:
            del self._arriving[rid]
        return len(self._arriving)

    def local_view(self, request: RouteRequest, now: float) -> RegionView:
        arriving = self._count_arriving(now)
        wait = self.dispatcher.predicted_wait(now, request.priority_rank, arriving)
        views = [v for v in self.dispatcher.views(now) if v.accepting]
        cached = max((request.cached_tokens(v.prefix) for v in views), default=0)
        return RegionView(self.name, 0.0, wait, math.isfinite(wait), cached)

    def choose(
        self,
        request: RouteRequest,
        spilled_from: str | None,
        now: float,
        local_failed: bool = False,
        exclude: Collection[str] = (),
    ) -> RegionChoice:
        """Where `request` goes. `local_failed`: the local replicas failed it before its
        first byte, so the local region counts as unable to serve (the policy's failover).
        `exclude`: peers that already failed it, which count as unable to serve too."""
        local = self.local_view(request, now)
        if local_failed:
            local = dataclasses.replace(local, healthy=False)
        peers = [
            dataclasses.replace(p.view(request), healthy=False) if name in exclude
            else p.view(request)
            for name, p in self.peers.items()
        ]  # fmt: skip
        asked = RegionRequest(request.num_prompt_tokens, spilled_from)
        choice = self.policy.choose(asked, local, peers, now)
        if not choice.leaves and not local_failed:
            self._arriving[request.request_id] = now
        return choice

    def describe(self, now: float) -> dict:
        """For /health."""
        return {
            "region": self.name,
            "policy": self.config.policy,
            "peers": {name: peer.describe() for name, peer in sorted(self.peers.items())},
        }
