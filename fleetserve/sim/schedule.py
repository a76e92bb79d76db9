"""`ScheduleScaler`: a fleet size by hour of the day, in the autoscaler's place.

`SimFleet` drives whatever it is given through the `Autoscaler` interface (`decide`,
`observe_cold_start`, `cold_start_s`); a planned fleet is one whose size is written down per
hour. Replicas for the next hour are ordered one cold start ahead, so that they are ready
when its traffic comes; surplus replicas drain at the hour's start, newest first.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetserve.fleet.autoscaler import FleetSnapshot, ScaleDecision


class ScheduleScaler:
    def __init__(self, size_at: Callable[[float], int], cold_start_s: float) -> None:
        self.size_at = size_at  # virtual time -> replicas wanted then
        self.cold_start_s = cold_start_s

    def observe_cold_start(self, seconds: float) -> None:
        self.cold_start_s = seconds

    def decide(self, snapshot: FleetSnapshot) -> ScaleDecision:
        now = snapshot.now
        desired = max(self.size_at(now), self.size_at(now + self.cold_start_s))
        removable = [r.id for r in snapshot.replicas if r.state in ("ready", "failed")]
        return ScaleDecision(desired, "schedule", tuple(reversed(removable)))
