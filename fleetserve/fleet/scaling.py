"""The autoscaler's settings and how it counts a replica's state: pure pieces shared by the
live fleet controller (`fleet/controller.py`) and the simulator, which must not import the
gateway's asyncio shell."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleetserve.fleet.autoscaler import AUTOSCALING_POLICIES, Autoscaler, AutoscalerConfig
from fleetserve.gateway.replica import Replica


@dataclass(frozen=True)
class AutoscalingSettings:
    """The autoscaler of `fleetserve serve`/`gateway`: a policy by name, its knobs, and the
    loop's own. Every field is a flag and a key of the `autoscaling:` mapping of
    `--gateway-config` (see `fleetserve.fleet.options`)."""

    policy: str = "kpa"
    config: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    interval_s: float = 1.0  # seconds between two decisions
    # Assumed start-to-ready time until one is measured (holding requests at zero).
    cold_start_estimate_s: float = 30.0

    def __post_init__(self) -> None:
        AUTOSCALING_POLICIES.check(self.policy)
        if not (self.interval_s > 0 and math.isfinite(self.interval_s)):
            raise ValueError(f"interval_s must be > 0 seconds, got {self.interval_s!r}")
        if not (self.cold_start_estimate_s >= 0 and math.isfinite(self.cold_start_estimate_s)):
            raise ValueError(
                f"cold_start_estimate_s must be >= 0 seconds, got {self.cold_start_estimate_s!r}"
            )

    def initial_replicas(self, asked: int | None) -> int:
        """The replicas to start with: `asked` (`--replicas`), else the minimum but at least
        one, so that the first request after a start does not wait for a cold start."""
        cfg = self.config
        if asked is None:
            return max(cfg.min_replicas, 1)
        if not cfg.min_replicas <= asked <= cfg.max_replicas:
            raise ValueError(
                f"--replicas {asked} is outside --min-replicas {cfg.min_replicas} .. "
                f"--max-replicas {cfg.max_replicas}"
            )
        return asked

    def new_policy(self) -> Autoscaler:
        return AUTOSCALING_POLICIES.get(self.policy)(self.config)


def policy_state(replica: Replica | None) -> str:
    """A replica's state as the policy counts it: a process being (re)started is loading, a
    ready one whose probe fails is still capacity (`ready`) until its supervisor says more."""
    if replica is None:  # its backend is still launching it
        return "loading"
    if replica.failed is not None:
        return "failed"
    if replica.draining:
        return "draining"
    if replica.loading or replica.down:
        return "loading"
    return "ready"
