"""Which region serves a request: the regional routing policies.

A regional gateway routes each request it receives either to its own replicas or to a peer
region's gateway. The policy is pure, like the replica routing policies: it reads frozen
`RegionView`s and a `RegionRequest`, gets ``now`` from its caller, and keeps only its own
bounded bookkeeping (the spill cap's window), so the live gateway and the simulator run the
very same object.

What a region costs a request is what its user waits before the first token, as far as the
gateway can predict it: the round trip to that region (zero for the local one), the predicted
wait for a replica slot there, less the prefill that the region's prefix cache would save::

    cost(r) = rtt_s(r) + predicted_wait_s(r) - cached_prefix_tokens(r) * prefill_s_per_token

Policies (`REGIONAL_POLICIES`):

- ``spill`` (the default): serve locally unless a healthy peer is cheaper by more than
  ``min_gain_s``, and send no more than ``max_spill_fraction`` of this region's requests
  (plus one) elsewhere over the last ``window_s``: a burst in one region must not flood its
  neighbours.
  The cost above already prefers a region that holds the request's prefix.
- ``least_load``: the global least-loaded region (lowest predicted wait, round trip only as a
  tie-break), the classic global balancer the spill policy is compared against.
- ``local``: always the local region, the baseline of regions that do not know each other.

Rules every policy keeps:

- No ping-pong: a request that a peer already spilled here (``spilled_from``) is served here,
  whatever the loads; it is never sent on.
- Failover: when the local region cannot serve (its gateway's replicas all failed, or the
  region was taken out), ``spill`` and ``least_load`` send the request to the nearest healthy
  peer (by round trip), outside the cap; an unhealthy peer is never chosen. ``local`` has no
  failover: that is what it is the baseline of.
- With nowhere healthy to go, the answer is the local region with reason ``unavailable``: the
  local gateway answers (holds, or 503s) as it would alone.
"""

from __future__ import annotations

import abc
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fleetserve.registry import Registry


@dataclass(frozen=True)
class RegionView:
    """One region as a gateway sees it at the moment of a decision."""

    name: str
    rtt_s: float  # round trip from the deciding gateway to this region's; 0 for the local one
    predicted_wait_s: float  # wait for a replica slot there (inf: no capacity at all)
    healthy: bool = True  # its gateway answers and it has (or is starting) a replica
    cached_prefix_tokens: int = 0  # tokens of this request's prompt already cached there


@dataclass(frozen=True)
class RegionRequest:
    prompt_tokens: int = 0
    spilled_from: str | None = None  # the region that sent it here, if a peer did


@dataclass(frozen=True)
class RegionChoice:
    region: str
    # "local", "spill", "failover", "pinned" (arrived spilled: served here), "capped" (a
    # cheaper peer exists but the cap is reached), or "unavailable" (nowhere healthy).
    reason: str
    cost_s: float  # the predicted cost of the chosen region (inf when unavailable)

    @property
    def leaves(self) -> bool:
        """True when the request goes to another region."""
        return self.reason in ("spill", "failover")


@dataclass(frozen=True)
class RegionalConfig:
    max_spill_fraction: float = 0.5  # of this region's requests over the window
    window_s: float = 60.0  # the cap's window
    min_gain_s: float = 0.05  # spill only when the peer is cheaper by more than this
    prefill_s_per_token: float = 0.0  # prefill time a cached prompt token saves (0: ignore)

    def __post_init__(self) -> None:
        for name in ("max_spill_fraction", "window_s", "min_gain_s", "prefill_s_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_spill_fraction > 1:
            raise ValueError(f"max_spill_fraction must be <= 1, got {self.max_spill_fraction!r}")
        if self.window_s == 0:
            raise ValueError("window_s must be > 0")


def cost(region: RegionView, config: RegionalConfig) -> float:
    """The predicted seconds before a request's first token in `region` (see module doc)."""
    saved = region.cached_prefix_tokens * config.prefill_s_per_token
    return region.rtt_s + region.predicted_wait_s - saved


class RegionalPolicy(abc.ABC):
    name: ClassVar[str]

    def __init__(self, config: RegionalConfig | None = None) -> None:
        self.config = config or RegionalConfig()

    def choose(
        self,
        request: RegionRequest,
        local: RegionView,
        peers: Sequence[RegionView],
        now: float,
    ) -> RegionChoice:
        """Where `request` goes; `peers` are the other regions (any order, any health)."""
        if request.spilled_from is not None:
            return RegionChoice(local.name, "pinned", cost(local, self.config))
        healthy = [p for p in peers if p.healthy]
        if not local.healthy:
            return self._failover(local, healthy)
        return self._choose(request, local, healthy, now)

    @abc.abstractmethod
    def _choose(
        self, request: RegionRequest, local: RegionView, peers: list[RegionView], now: float
    ) -> RegionChoice:
        """The choice when the local region is healthy; `peers` are the healthy ones."""

    def _failover(self, local: RegionView, healthy_peers: list[RegionView]) -> RegionChoice:
        if not healthy_peers:
            return RegionChoice(local.name, "unavailable", math.inf)
        nearest = min(healthy_peers, key=lambda p: (p.rtt_s, p.name))
        return RegionChoice(nearest.name, "failover", cost(nearest, self.config))


class LocalOnly(RegionalPolicy):
    """Every request stays in its region; no failover (the baseline)."""

    name = "local"

    def _failover(self, local, healthy_peers):
        return RegionChoice(local.name, "unavailable", math.inf)

    def _choose(self, request, local, peers, now):
        return RegionChoice(local.name, "local", cost(local, self.config))


class GlobalLeastLoad(RegionalPolicy):
    """The region with the lowest predicted wait, wherever it is; round trip breaks ties."""

    name = "least_load"

    def _choose(self, request, local, peers, now):
        best = min([local, *peers], key=lambda r: (r.predicted_wait_s, r.rtt_s, r.name))
        reason = "local" if best.name == local.name else "spill"
        return RegionChoice(best.name, reason, cost(best, self.config))


class Spill(RegionalPolicy):
    """Local unless a peer is cheaper by more than `min_gain_s`, within the spill cap."""

    name = "spill"

    def __init__(self, config: RegionalConfig | None = None) -> None:
        super().__init__(config)
        # (time, spilled) of this region's own decisions over the cap's window.
        self._decisions: deque[tuple[float, bool]] = deque()
        self._spilled_in_window = 0

    def spilled_fraction(self, now: float) -> float:
        """The share of this region's requests sent elsewhere over the window ending now."""
        self._forget(now)
        return self._spilled_in_window / len(self._decisions) if self._decisions else 0.0

    def _forget(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._decisions and self._decisions[0][0] <= horizon:
            _, spilled = self._decisions.popleft()
            self._spilled_in_window -= spilled

    def _record(self, now: float, spilled: bool) -> None:
        self._decisions.append((now, spilled))
        self._spilled_in_window += spilled

    def _choose(self, request, local, peers, now):
        self._forget(now)
        local_cost = cost(local, self.config)
        best = min(peers, key=lambda p: (cost(p, self.config), p.rtt_s, p.name), default=None)
        if best is None or not cost(best, self.config) + self.config.min_gain_s < local_cost:
            self._record(now, False)
            return RegionChoice(local.name, "local", local_cost)
        # Spill while the share spilled so far, this request counted, is under the cap: the
        # first request of a quiet window may go, and the share stays within the cap plus one
        # request.
        decided = len(self._decisions) + 1
        if not self._spilled_in_window < self.config.max_spill_fraction * decided:
            self._record(now, False)
            return RegionChoice(local.name, "capped", local_cost)
        self._record(now, True)
        return RegionChoice(best.name, "spill", cost(best, self.config))


REGIONAL_POLICIES: Registry[type[RegionalPolicy]] = Registry(
    "regional policy",
    {
        "local": "fleetserve.regions.policy:LocalOnly",
        "least_load": "fleetserve.regions.policy:GlobalLeastLoad",
        "spill": "fleetserve.regions.policy:Spill",
    },
)
