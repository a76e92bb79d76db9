"""The regional routing policies on plain data with `now` as the clock: exact choices."""

from __future__ import annotations

import math

import pytest

from fleetserve.regions.policy import (
    REGIONAL_POLICIES,
    GlobalLeastLoad,
    LocalOnly,
    RegionalConfig,
    RegionRequest,
    RegionView,
    Spill,
    cost,
)

REQ = RegionRequest(prompt_tokens=100)


def region(name: str, rtt: float = 0.0, wait: float = 0.0, **kw) -> RegionView:
    return RegionView(name, rtt, wait, **kw)


def spill(**kw) -> Spill:
    return Spill(RegionalConfig(**{"min_gain_s": 0.0, **kw}))


def test_local_when_idle():
    choice = spill().choose(REQ, region("a"), [region("b", rtt=0.08)], now=0.0)
    assert (choice.region, choice.reason, choice.leaves) == ("a", "local", False)


def test_spills_only_when_local_wait_passes_peer_wait_plus_rtt():
    peers = [region("b", rtt=0.1, wait=0.2)]
    # local 0.29 < 0.3: stay; local 0.31 > 0.3: go.
    assert spill().choose(REQ, region("a", wait=0.29), peers, 0.0).region == "a"
    choice = spill().choose(REQ, region("a", wait=0.31), peers, 0.0)
    assert (choice.region, choice.reason, choice.leaves) == ("b", "spill", True)
    assert choice.cost_s == pytest.approx(0.3)


def test_min_gain_is_hysteresis():
    peers = [region("b", rtt=0.1, wait=0.2)]
    policy = spill(min_gain_s=0.05)
    assert policy.choose(REQ, region("a", wait=0.34), peers, 0.0).region == "a"
    assert policy.choose(REQ, region("a", wait=0.36), peers, 0.0).region == "b"


def test_cheapest_peer_wins_and_rtt_counts():
    local = region("a", wait=1.0)
    near_busy = region("b", rtt=0.05, wait=0.5)  # 0.55
    far_idle = region("c", rtt=0.3, wait=0.0)  # 0.30
    assert spill().choose(REQ, local, [near_busy, far_idle], 0.0).region == "c"


def test_prefix_preference():
    config = {"prefill_s_per_token": 0.001}
    local = region("a", wait=0.3)
    plain = region("b", rtt=0.1, wait=0.0)  # 0.1
    cached = region("c", rtt=0.15, wait=0.0, cached_prefix_tokens=100)  # 0.15 - 0.1 = 0.05
    assert spill(**config).choose(REQ, local, [plain, cached], 0.0).region == "c"
    # The local region's own cache keeps a request home.
    home = region("a", wait=0.3, cached_prefix_tokens=300)  # 0.3 - 0.3 = 0
    assert spill(**config).choose(REQ, home, [plain, cached], 0.0).region == "a"
    # Prefixes count for nothing when prefill_s_per_token is 0.
    assert spill().choose(REQ, local, [plain, cached], 0.0).region == "b"


def test_cap_bounds_the_share_spilled_over_the_window():
    policy = spill(max_spill_fraction=0.5, window_s=10.0)
    busy = region("a", wait=5.0)
    idle = [region("b", rtt=0.1)]
    reasons = [policy.choose(REQ, busy, idle, now=float(t) * 0.1).reason for t in range(6)]
    assert reasons == ["spill", "capped", "spill", "capped", "spill", "capped"]
    assert policy.spilled_fraction(0.5) == pytest.approx(0.5)
    # After the window, the decisions are forgotten: the next one may spill again.
    assert policy.choose(REQ, busy, idle, now=20.0).reason == "spill"
    assert policy.spilled_fraction(20.0) == 1.0


def test_local_decisions_count_toward_the_cap():
    policy = spill(max_spill_fraction=0.25, window_s=10.0)
    idle_local, idle = region("a"), [region("b", rtt=0.1)]
    for t in range(3):
        assert policy.choose(REQ, idle_local, idle, now=t).reason == "local"
    busy = region("a", wait=5.0)
    assert policy.choose(REQ, busy, idle, now=3).reason == "spill"  # 0 < 0.25 x 4
    assert policy.choose(REQ, busy, idle, now=4).reason == "spill"  # 1 < 0.25 x 5
    assert policy.choose(REQ, busy, idle, now=5).reason == "capped"  # 2 >= 0.25 x 6


def test_zero_cap_never_spills_but_still_fails_over():
    policy = spill(max_spill_fraction=0.0)
    peers = [region("b", rtt=0.1)]
    assert policy.choose(REQ, region("a", wait=9.0), peers, 0.0).reason == "capped"
    dark = region("a", healthy=False)
    assert policy.choose(REQ, dark, peers, 0.0).reason == "failover"


@pytest.mark.parametrize("name", ["spill", "least_load", "local"])
def test_no_second_spill(name):
    policy = REGIONAL_POLICIES.get(name)(RegionalConfig(min_gain_s=0.0))
    spilled = RegionRequest(prompt_tokens=10, spilled_from="b")
    busy = region("a", wait=100.0)
    choice = policy.choose(spilled, busy, [region("c", rtt=0.01)], 0.0)
    assert (choice.region, choice.reason, choice.leaves) == ("a", "pinned", False)
    # Even a dark local region does not send it on: the origin is the one to fail over.
    dark = region("a", healthy=False)
    assert policy.choose(spilled, dark, [region("c")], 0.0).region == "a"


def test_failed_region_is_skipped_and_users_go_to_the_next_nearest():
    policy = spill()
    dark = region("a", healthy=False)
    peers = [region("far", rtt=0.3), region("near", rtt=0.1, healthy=False), region("mid", 0.2)]
    choice = policy.choose(REQ, dark, peers, 0.0)
    assert (choice.region, choice.reason) == ("mid", "failover")
    # An unhealthy peer is never a spill target either, however idle.
    busy = region("a", wait=5.0)
    choice = policy.choose(REQ, busy, [region("b", 0.01, healthy=False), region("c", 0.2)], 0.0)
    assert choice.region == "c"


def test_nowhere_to_go_is_unavailable_locally():
    dark = region("a", healthy=False)
    choice = spill().choose(REQ, dark, [region("b", healthy=False)], 0.0)
    assert (choice.region, choice.reason, choice.cost_s) == ("a", "unavailable", math.inf)
    assert LocalOnly().choose(REQ, dark, [region("b")], 0.0).reason == "unavailable"


def test_no_capacity_anywhere_stays_local():
    local = region("a", wait=math.inf)
    assert spill().choose(REQ, local, [region("b", 0.1, math.inf)], 0.0).reason == "local"


def test_least_load_ignores_distance_except_for_ties():
    policy = GlobalLeastLoad()
    local = region("a", wait=0.2)
    far = region("b", rtt=0.3, wait=0.1)
    assert policy.choose(REQ, local, [far], 0.0).region == "b"
    tie = region("c", rtt=0.3, wait=0.2)
    assert policy.choose(REQ, local, [tie], 0.0).region == "a"


def test_local_only_never_leaves():
    policy = LocalOnly()
    choice = policy.choose(REQ, region("a", wait=100.0), [region("b", rtt=0.001)], 0.0)
    assert (choice.region, choice.reason) == ("a", "local")


def test_cost_formula():
    config = RegionalConfig(prefill_s_per_token=0.002)
    view = region("b", rtt=0.1, wait=0.5, cached_prefix_tokens=50)
    assert cost(view, config) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_spill_fraction": 1.5},
        {"max_spill_fraction": -0.1},
        {"window_s": 0},
        {"window_s": math.inf},
        {"min_gain_s": math.nan},
        {"prefill_s_per_token": -1},
        {"min_gain_s": True},
        {"window_s": "60"},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RegionalConfig(**bad)


def test_registry_names():
    assert REGIONAL_POLICIES.names() == ["least_load", "local", "spill"]
    assert REGIONAL_POLICIES.get("spill") is Spill
