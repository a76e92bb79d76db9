"""Autoscaling and discovery settings an operator can mistype (found by attacking the flags
and the `autoscaling:` mapping): each is refused with a ValueError naming it, or works.
Each test here failed on main when it was written."""

from __future__ import annotations

import argparse
import math

import pytest

from fleetserve.fleet.autoscaler import (
    AUTOSCALING_POLICIES,
    AutoscalerConfig,
    FleetSnapshot,
    ReplicaSample,
)
from fleetserve.fleet.kubernetes import DiscoveryTarget
from fleetserve.fleet.options import add_autoscaling_arguments, autoscaling_from_args


def busy_snapshot(now: float) -> FleetSnapshot:
    """One ready replica with 45 requests on it: far above any target of 16."""
    replica = ReplicaSample("r0", "ready", 40, 5, 0.0, 0.0)
    return FleetSnapshot(now, (replica,), 0, 45)


@pytest.mark.parametrize(
    "knobs",
    [{"max_scale_up_rate": math.inf}, {"target_concurrency": 1e-320}],
    ids=["max-scale-up-rate-inf", "target-concurrency-denormal"],
)
def test_a_knob_that_makes_a_decision_infinite_is_refused_or_still_scales_up(knobs):
    """`--max-scale-up-rate inf` (or a denormal target) was accepted, and every scale-up
    decision then raised OverflowError (math.floor/ceil of inf): the controller logs it
    and the fleet never grows."""
    try:
        config = AutoscalerConfig(min_replicas=0, max_replicas=4, **knobs)
    except ValueError:
        return  # refused at the door: fine
    policy = AUTOSCALING_POLICIES.get("kpa")(config)
    decision = None
    for t in range(5):
        decision = policy.decide(busy_snapshot(float(t)))
    assert decision.desired > 1


def test_an_infinite_scale_up_rate_is_refused_or_still_activates_a_fleet_at_zero():
    """At zero replicas with requests held, the "activate" decision hit the same
    OverflowError: the fleet never left zero and every held request ran out its deadline."""
    try:
        config = AutoscalerConfig(min_replicas=0, max_replicas=4, max_scale_up_rate=math.inf)
    except ValueError:
        return
    policy = AUTOSCALING_POLICIES.get("kpa")(config)
    decision = policy.decide(FleetSnapshot(0.0, (), 3, 0))  # none yet, three requests held
    assert decision.desired >= 1


def args_with_config(tmp_path, text: str) -> argparse.Namespace:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway-config")
    add_autoscaling_arguments(parser)
    return parser.parse_args(["--gateway-config", str(path)])


def test_max_samples_in_the_autoscaling_mapping_is_taken_or_refused_by_name(tmp_path):
    """`max_samples` is an AutoscalerConfig field, so a documented key of `autoscaling:`; it
    has no flag, and the type check's lookup raised StopIteration (a traceback, not the
    command line's error)."""
    args = args_with_config(tmp_path, "autoscaling:\n  min_replicas: 0\n  max_samples: 10\n")
    try:
        settings = autoscaling_from_args(args)
    except ValueError as exc:
        assert "max_samples" in str(exc)
        return
    assert settings.config.max_samples == 10


@pytest.mark.parametrize(
    "uri", ["kubernetes://café/svc", "kubernetes://ns/sv²c", "kubernetes://ns/svc:pört"]
)
def test_discover_refuses_names_kubernetes_would_not_take(uri):
    """str.islower()/isdigit() accept non-ASCII letters and digits; a Kubernetes name is
    [a-z0-9-] only."""
    with pytest.raises(ValueError):
        DiscoveryTarget.parse(uri)
