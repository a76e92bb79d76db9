"""The autoscaling policy: how many replicas the fleet wants, from what it observes.

`Autoscaler.decide(snapshot)` is pure: no I/O, no clock reads (the snapshot's ``now`` is the
clock), no asyncio, so the fleet controller and the simulator run the same object. It keeps a
bounded history of what it was shown; nothing else.

Algorithm (Knative's KPA, fed with what an LLM fleet knows)
-----------------------------------------------------------
1. *Load* is the fleet's concurrency: the requests the replicas run or queue (``running +
   waiting`` from each replica's ``/metrics``, draining ones included since their streams stay
   on the fleet) or the gateway's in-flight count if larger (replica metrics lag), plus the
   requests held at the gateway (``gateway_queued``). ``kv_cache_usage`` is carried for
   policies that scale on it (AIBrix's examples do); this one does not, because a full KV
   cache already shows as waiting requests.
2. Each call appends ``(now, load)``; the averages over the *stable* window and over the
   *panic* window (a fraction of it) give ``desired = ceil(avg / target_concurrency)``.
3. *Panic* starts when the panic-window figure ``avg / target_concurrency`` (unrounded, as
   Knative) is at least ``panic_threshold`` times the ready replicas, and lasts until a stable
   window has passed without that. In panic the
   fleet follows the panic figure, never below the highest panic figure seen nor below its
   current size: it does not scale down while panicking.
4. *Stable* scale-up is immediate. Scale-down asks for ``ceil(avg / (target_concurrency x
   (1 - scale_down_tolerance)))``, a size still under its target by the tolerance, and waits:
   that lower figure must hold for the whole scale-down delay (any higher sample restarts
   it, and so does a replica getting ready: it gets the whole delay, not what is left of one
   that ran out while it loaded),
   then the fleet goes to the highest figure of the delay (Knative's max-over-window).
5. SLOs: a TTFT or ITL p90 above its SLO is pressure. It blocks scale-down and, unless a
   replica is already loading, asks for one more.
6. Zero: with ``min_replicas == 0`` and no load at all for the grace period (counted from
   when no replica is loading any more) the fleet goes to zero (reason ``idle_to_zero``); at
   zero, any load (a request held at the gateway) brings one replica at once (reason
   ``activate``).
7. Steps are bounded by ``max_scale_up_step``/``max_scale_up_rate`` and
   ``max_scale_down_step``/``max_scale_down_rate``, then clamped to
   ``[min_replicas, max_replicas]``. The fleet never shrinks below its loading replicas
   plus one ready one (while others load, the last ready replica serves).

Cold starts are part of the decision: replicas still loading count toward capacity (so the
policy does not add more while they load) and are never chosen for removal; no cooldown (the
scale-down delay, the scale-to-zero grace) is shorter than the longest of the last observed
cold starts (`observe_cold_start`), so a model that takes 3 minutes to load is not stopped
after 30 s of quiet only to be needed again. The replicas removed are the least loaded ready
ones (fewest ``running + waiting``), the newest first among equals.

Defaults next to the peers'
---------------------------
Ours (``AutoscalerConfig``) | Knative KPA (``config-autoscaler``) | Ray Serve
(``autoscaling_config``) | AIBrix (``PodAutoscaler``; its KPA strategy is Knative's algorithm,
its APA a tolerance band around one metric's target):

- ``target_concurrency = 16`` | ``container-concurrency-target-default = 100`` at
  ``container-concurrency-target-percentage = 70`` | ``target_ongoing_requests = 2`` |
  ``targetValue`` of the chosen metric (e.g. ``gpu_cache_usage_perc``).
- ``stable_window_s = 60`` | ``stable-window = 60s`` | ``look_back_period_s = 30`` (polled every
  ``metrics_interval_s = 10``) | KPA: Knative's; APA: ``apa.autoscaling.aibrix.ai/window``.
- ``panic_window_fraction = 0.10``, ``panic_threshold = 2.0`` | ``panic-window-percentage = 10``,
  ``panic-threshold-percentage = 200`` | no panic mode | KPA: Knative's; APA: none.
- ``max_scale_up_rate = 1000``, ``max_scale_up_step = 8`` | ``max-scale-up-rate = 1000``, no step
  | ``upscaling_factor = None`` (``upscale_smoothing_factor``) | ``autoscaling.aibrix.ai/
  max-scale-up-rate``; APA ``up-fluctuation-tolerance = 0.1``.
- ``max_scale_down_rate = 2.0``, ``max_scale_down_step = 1`` | ``max-scale-down-rate = 2``, no step
  | ``downscaling_factor = None`` | ``autoscaling.aibrix.ai/max-scale-down-rate``; APA
  ``down-fluctuation-tolerance = 0.2``.
- ``scale_down_delay_s = 60`` | ``scale-down-delay = 0s`` | ``downscale_delay_s = 600`` (and
  ``upscale_delay_s = 30``) | none beyond the window and tolerance.
- ``scale_to_zero_grace_s = 30`` | ``scale-to-zero-grace-period = 30s`` (after a stable window
  without traffic) | ``downscale_to_zero_delay_s = None`` (falls back to ``downscale_delay_s``)
  | ``minReplicas: 0``.
- ``min_replicas = 1``, ``max_replicas = 4`` | ``min-scale = 0``, ``max-scale = 0`` (unbounded) |
  ``min_replicas = 1``, ``max_replicas = 1`` | ``minReplicas``, ``maxReplicas``.
- ``scale_down_tolerance = 0.1`` | none | none | APA ``down-fluctuation-tolerance = 0.2``.
- ``ttft_p90_slo_s``/``itl_p90_slo_s = None`` | none | none | none (one metric per autoscaler).
- cooldowns raised to the measured cold start | none | none | none.

Where ours differs, and why:

- ``target_concurrency = 16``, not 100 (Knative, sized for HTTP containers) nor 2 (Ray, sized
  for one-request-at-a-time Python replicas): an engine with continuous batching runs many
  requests at once, but TTFT grows as soon as requests wait. 16 leaves the panic threshold
  (32) well inside the default batch (``max_num_seqs = 256``); set it from ``fleetserve
  bench`` as the concurrency at which TTFT p90 meets your SLO.
- Bounded *steps* on top of Knative's *rates*: an LLM replica is a GPU and minutes of loading,
  so one bad sample must not order dozens; the next tick adds more if the load is real.
  Scale-down goes one replica at a time because each removed replica drains by migrating its
  streams onto the others.
- ``scale_down_delay_s = 60`` where Knative has 0 (its stable window already smooths) and Ray
  600: a delay of one stable window stops the flapping the Ray trackers report (ray#18925,
  #26455) without the 10 minutes of idle GPUs, and it is raised to the measured cold start.
- ``scale_down_tolerance = 0.1``: Knative has no band, so a load sitting on a replica
  boundary (40 requests at a target of 8) flips between 5 and 6 replicas; AIBrix's APA has the
  same idea (``down-fluctuation-tolerance``). Scale-up keeps the plain target, so the band
  costs at most 10% extra capacity and only on the way down.
- Cooldowns never shorter than a cold start: no peer ties them together; cooldowns shorter
  than the load time are how a model "never recovers".
- No upscale delay (Ray's ``upscale_delay_s = 30``): panic mode plays that role, and replicas
  already loading count as capacity, which is what stops double scale-ups.
- Averages are the mean of the samples in the window (the fleet samples on a fixed tick),
  not Knative's time-weighted buckets; ``max_samples`` bounds the memory.
- SLO pressure (TTFT/ITL p90) is an input; Knative and Ray scale on concurrency only and AIBrix
  on one metric at a time.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, fields

from fleetserve.registry import Registry

logger = logging.getLogger(__name__)

# Below it, load / target overflows a float (ceil(inf)); no fleet wants a replica per
# hundredth of a request.
MIN_TARGET_CONCURRENCY = 0.01
COLD_STARTS_KEPT = 5  # the cooldown follows the slowest of the last few loads, not all time's


@dataclass(frozen=True)
class ReplicaSample:
    """What the fleet knows of one replica at ``now``."""

    id: str
    state: str  # "loading" | "ready" | "draining" | "failed"
    running: int  # engine's running requests (from its /metrics)
    waiting: int  # engine's waiting requests
    kv_cache_usage: float  # 0..1
    started_at: float  # when its process started (for cold-start accounting)


@dataclass(frozen=True)
class FleetSnapshot:
    now: float
    replicas: tuple[ReplicaSample, ...]
    gateway_queued: int  # requests waiting at the gateway for a slot (incl. held at zero)
    gateway_in_flight: int
    ttft_p90_s: float | None = None  # over the policy's window, if known
    itl_p90_s: float | None = None


@dataclass(frozen=True)
class ScaleDecision:
    desired: int  # replicas wanted (loading + ready; draining ones excluded)
    reason: str  # "panic" | "stable" | "idle_to_zero" | "activate" | "slo" | "min" | "max" | "hold"
    remove: tuple[str, ...] = ()  # ids to drain when desired < current (never a loading one)


@dataclass(frozen=True)
class AutoscalerConfig:
    """The policy's knobs; the module docstring sets each default next to Knative's, Ray
    Serve's and AIBrix's."""

    min_replicas: int = 1
    max_replicas: int = 4
    # running + waiting requests wanted per replica (Knative's container-concurrency target)
    target_concurrency: float = 16.0
    stable_window_s: float = 60.0
    panic_window_fraction: float = 0.10  # of the stable window
    panic_threshold: float = 2.0  # panic when the panic-window desired >= 2x the ready replicas
    max_scale_up_step: int = 8  # replicas added per decision, at most
    max_scale_up_rate: float = 1000.0  # desired <= current x rate
    max_scale_down_step: int = 1  # replicas removed per decision, at most
    max_scale_down_rate: float = 2.0  # desired >= current / rate
    scale_down_tolerance: float = 0.1  # shrink only below (1 - this) x target per replica
    scale_down_delay_s: float = 60.0  # lower desired must hold this long (raised to a cold start)
    scale_to_zero_grace_s: float = 30.0  # no load this long -> 0 (raised to a cold start)
    ttft_p90_slo_s: float | None = None
    itl_p90_slo_s: float | None = None
    max_samples: int = 3600  # bound on the history kept (one sample per decision)

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"AutoscalerConfig.{name} = {getattr(self, name)!r}: {why}")

        for f in fields(self):  # inf makes a decision infinite (OverflowError in ceil)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f.name, "must be a finite number")
        if self.min_replicas < 0:
            fail("min_replicas", "must be >= 0 (0 allows scale to zero)")
        if self.max_replicas < 1:
            fail("max_replicas", "must be >= 1")
        if self.max_replicas < self.min_replicas:
            fail("max_replicas", f"must be >= min_replicas ({self.min_replicas})")
        if not self.target_concurrency >= MIN_TARGET_CONCURRENCY:
            fail("target_concurrency", f">= {MIN_TARGET_CONCURRENCY} requests per replica")
        if not self.stable_window_s > 0:
            fail("stable_window_s", "must be > 0 seconds")
        if not 0 < self.panic_window_fraction <= 1:
            fail("panic_window_fraction", "must be in (0, 1], a fraction of the stable window")
        if not self.panic_threshold > 1:
            fail("panic_threshold", "must be > 1 (2.0 panics at twice the ready capacity)")
        for name in ("max_scale_up_step", "max_scale_down_step"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1 replica")
        for name in ("max_scale_up_rate", "max_scale_down_rate"):
            if not getattr(self, name) > 1:
                fail(name, "must be > 1 (a factor of the current size)")
        if not 0 <= self.scale_down_tolerance < 1:
            fail("scale_down_tolerance", "must be in [0, 1), a fraction of the target")
        for name in ("scale_down_delay_s", "scale_to_zero_grace_s"):
            if not getattr(self, name) >= 0:
                fail(name, "must be >= 0 seconds")
        for name in ("ttft_p90_slo_s", "itl_p90_slo_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                fail(name, "must be > 0 seconds, or None for no SLO")
        if self.max_samples < 2:
            fail("max_samples", "must be >= 2")

    @property
    def panic_window_s(self) -> float:
        return self.stable_window_s * self.panic_window_fraction


def _window_mean(samples: Iterable[tuple[float, float]], since: float) -> float:
    values = [value for t, value in samples if t > since]
    return sum(values) / len(values) if values else 0.0


class Autoscaler:
    """Knative-KPA-style policy (see the module docstring). Pure: ``decide`` reads only its
    snapshot and its own history; it does no I/O and reads no clock."""

    def __init__(self, config: AutoscalerConfig) -> None:
        self.config = config
        self._load: deque[tuple[float, float]] = deque(maxlen=config.max_samples)
        # (now, desired before the delay) while desired stays below the fleet's size
        self._lower: deque[tuple[float, int]] = deque(maxlen=config.max_samples)
        self._lower_since: float | None = None
        self._cold_starts: deque[float] = deque(maxlen=COLD_STARTS_KEPT)
        self._last_busy: float | None = None
        self._last_now: float | None = None
        self._panic_until: float | None = None
        self._ready_before: int | None = None  # ready replicas at the previous decision
        self._panic_peak = 0

    def observe_cold_start(self, seconds: float) -> None:
        """Record one measured load-to-ready time; cooldowns are never shorter than the
        slowest of the last few."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"cold start {seconds!r} s: must be a finite number >= 0")
        self._cold_starts.append(seconds)

    @property
    def cold_start_s(self) -> float:
        return max(self._cold_starts, default=0.0)

    @property
    def scale_down_delay_s(self) -> float:
        return max(self.config.scale_down_delay_s, self.cold_start_s)

    @property
    def scale_to_zero_grace_s(self) -> float:
        return max(self.config.scale_to_zero_grace_s, self.cold_start_s)

    def in_panic(self, now: float) -> bool:
        return self._panic_until is not None and now < self._panic_until

    def decide(self, snapshot: FleetSnapshot) -> ScaleDecision:
        """How many replicas (loading + ready) the fleet should have at ``snapshot.now``, and
        which ready ones to drain if fewer. Appends the snapshot to the history, so call it
        once per tick with a clock that does not go back."""
        cfg, now = self.config, snapshot.now
        assert self._last_now is None or now >= self._last_now, "the snapshot clock went back"
        self._last_now = now
        loading = sum(r.state == "loading" for r in snapshot.replicas)
        ready = sum(r.state == "ready" for r in snapshot.replicas)
        current = loading + ready
        if self._ready_before is not None and ready > self._ready_before:
            self._forget_lower()  # a replica that just got ready gets the whole delay
        self._ready_before = ready

        on_replicas = sum(r.running + r.waiting for r in snapshot.replicas)
        load = max(on_replicas, snapshot.gateway_in_flight) + snapshot.gateway_queued
        self._load.append((now, float(load)))
        while self._load and self._load[0][0] <= now - cfg.stable_window_s:
            self._load.popleft()
        if load > 0 or loading > 0 or self._last_busy is None:
            self._last_busy = now  # a replica still loading has not had its chance yet

        if current == 0 and load > 0:
            return self._bounded(max(1, cfg.min_replicas), "activate", snapshot, current)
        if current == 0 and cfg.min_replicas == 0:
            return ScaleDecision(0, "hold")  # at zero only a request brings a replica back

        stable_avg = _window_mean(self._load, now - cfg.stable_window_s)
        # Knative compares the unrounded panic figure with the threshold: rounding up would
        # turn 1.25 replicas' worth of Poisson noise on one replica into "2x".
        panic_ratio = _window_mean(self._load, now - cfg.panic_window_s) / cfg.target_concurrency
        panic = math.ceil(panic_ratio)
        if panic_ratio >= cfg.panic_threshold * max(1, ready):
            if not self.in_panic(now):
                logger.info("panic: %d replicas wanted for %d ready", panic, ready)
            self._panic_until = now + cfg.stable_window_s
        elif self._panic_until is not None and not self.in_panic(now):
            self._panic_until, self._panic_peak = None, 0

        if self.in_panic(now):
            self._panic_peak = max(self._panic_peak, panic)
            wanted, reason = max(self._panic_peak, current), "panic"
        else:
            wanted, reason = max(math.ceil(stable_avg / cfg.target_concurrency), 1), "stable"
            if wanted < current:
                # Shrink only to a size that would still be under its target by the
                # tolerance, so the next sample's noise does not ask for the replica back.
                down_target = cfg.target_concurrency * (1 - cfg.scale_down_tolerance)
                wanted = min(current, max(math.ceil(stable_avg / down_target), 1))

        if self._slo_breached(snapshot):
            wanted = max(wanted, current if loading else current + 1)
            reason = "slo" if wanted > current else reason

        if cfg.min_replicas == 0 and now - self._last_busy >= self.scale_to_zero_grace_s:
            self._forget_lower()
            return self._bounded(loading, "idle_to_zero", snapshot, current)

        if wanted < current:
            wanted = self._after_delay(now, wanted, current)
        else:
            self._forget_lower()
        return self._bounded(wanted, reason, snapshot, current)

    def _slo_breached(self, snapshot: FleetSnapshot) -> bool:
        cfg = self.config
        return any(
            slo is not None and seen is not None and seen > slo
            for seen, slo in (
                (snapshot.ttft_p90_s, cfg.ttft_p90_slo_s),
                (snapshot.itl_p90_s, cfg.itl_p90_slo_s),
            )
        )

    def _after_delay(self, now: float, wanted: int, current: int) -> int:
        """Scale down only once the desired has stayed below ``current`` for the whole delay,
        and then only to the highest desired seen in that delay."""
        if self._lower_since is None:
            self._lower_since = now
        self._lower.append((now, wanted))
        delay = self.scale_down_delay_s
        while self._lower and self._lower[0][0] < now - delay:
            self._lower.popleft()
        if now - self._lower_since < delay:
            return current
        return max(w for _, w in self._lower)

    def _forget_lower(self) -> None:
        self._lower.clear()
        self._lower_since = None

    def _bounded(
        self, wanted: int, reason: str, snapshot: FleetSnapshot, current: int
    ) -> ScaleDecision:
        """Apply the step and rate bounds, keep every loading replica, clamp to [min, max], and
        name the replicas to drain."""
        cfg = self.config
        if wanted > current:
            up_rate_bound = math.floor(max(current, 1) * cfg.max_scale_up_rate)
            wanted = min(wanted, current + cfg.max_scale_up_step, up_rate_bound)
        elif wanted < current:
            down_rate_bound = math.ceil(current / cfg.max_scale_down_rate)
            if reason == "idle_to_zero" and current == 1:
                down_rate_bound = 0  # the last replica goes as a whole
            wanted = max(wanted, current - cfg.max_scale_down_step, down_rate_bound)
        loading = sum(r.state == "loading" for r in snapshot.replicas)
        ready = sum(r.state == "ready" for r in snapshot.replicas)
        # Loading replicas cannot be drained, and while they load the last ready one serves.
        keep = loading + (min(ready, 1) if reason != "idle_to_zero" else 0)
        wanted = max(wanted, keep)
        desired = min(max(wanted, cfg.min_replicas), cfg.max_replicas)
        if desired == current:
            reason = "hold"
        elif desired != wanted:
            reason = "min" if desired > wanted else "max"
        remove: tuple[str, ...] = ()
        if desired < current:
            idle_first = sorted(
                (r for r in snapshot.replicas if r.state == "ready"),
                key=lambda r: (r.running + r.waiting, -r.started_at),
            )
            remove = tuple(r.id for r in idle_first[: current - desired])
        if desired != current:
            logger.info("scale %d -> %d (%s)", current, desired, reason)
        return ScaleDecision(desired=desired, reason=reason, remove=remove)


# Autoscaling policies by name, imported on first use (the simulator and the CLI pick one).
AUTOSCALING_POLICIES: Registry[type[Autoscaler]] = Registry(
    "autoscaling policy",
    {
        "kpa": "fleetserve.fleet.autoscaler:Autoscaler",
    },
)
