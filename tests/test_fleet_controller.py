"""The fleet's control loop (`FleetController`) on plain data: a real gateway table (never
started), a stub supervisor that records its targets, and a fake clock. The policy itself
is tested in tests/test_autoscaler.py, the supervisor in tests/test_fleet_scaling.py; here,
what the loop shows the policy and what it hands the supervisor. And the options: every
knob a flag and a config key."""

from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest
import test_fleet_scaling
from gateway_harness import wait_until

from fleetserve.fleet.autoscaler import Autoscaler, AutoscalerConfig
from fleetserve.fleet.controller import FleetController
from fleetserve.fleet.options import add_autoscaling_arguments, autoscaling_from_args
from fleetserve.fleet.scaling import AutoscalingSettings
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.options import add_gateway_arguments


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class StubSupervisor:
    def __init__(self, ids: list[str], failed: tuple[int, ...] = ()) -> None:
        self.ids = ids
        self.serving = list(range(len(ids)))
        self.failed = {i: "crash loop" for i in failed}
        self.targets: list[tuple[int, tuple[str, ...], str]] = []

    def replica_ids(self) -> list[str]:
        return self.ids

    def set_target(self, n: int, remove=(), *, reason: str = "manual") -> None:
        self.targets.append((n, tuple(remove), reason))


def gateway(clock: Clock) -> Gateway:
    return Gateway(GatewayConfig(router="round_robin"), clock=clock)


def add(gw: Gateway, rid: str, **state) -> None:
    replica = gw.add_replica(f"http://127.0.0.1:9/{rid}", replica_id=rid)
    for name, value in state.items():
        setattr(replica, name, value)


def controller(gw, sup, **config) -> FleetController:
    policy = Autoscaler(AutoscalerConfig(**{"min_replicas": 0, **config}))
    return FleetController(gw, sup, policy, interval_s=1.0, cold_start_estimate_s=12.0)


def test_the_snapshot_shows_the_policy_each_replica_as_it_counts_them():
    clock = Clock()
    gw = gateway(clock)
    add(gw, "r0", ready=True, started_at=1.0)
    add(gw, "r1", loading=True, started_at=2.0)
    add(gw, "r2", down=True)  # exited, being restarted
    add(gw, "r3", ready=True, draining=True)
    add(gw, "r4", failed="crash loop")
    add(gw, "r5", ready=False)  # a probe failed: still capacity until its supervisor says
    add(gw, "admin", ready=True)  # added through the admin API: not the fleet's to scale
    gw.replicas["r0"].load.running, gw.replicas["r0"].load.waiting = 3, 2
    gw.replicas["r0"].outstanding, gw.replicas["admin"].outstanding = 4, 1
    sup = StubSupervisor(["r0", "r1", "r2", "r3", "r4", "r5", "r6"])  # r6: still launching
    clock.now = 5.0
    snap = controller(gw, sup).snapshot()
    states = {r.id: r.state for r in snap.replicas}
    assert states == {
        "r0": "ready",
        "r1": "loading",
        "r2": "loading",
        "r3": "draining",
        "r4": "failed",
        "r5": "ready",
        "r6": "loading",
    }
    r0 = snap.replicas[0]
    assert (r0.running, r0.waiting, r0.started_at) == (3, 2, 1.0)
    assert snap.now == 5.0 and snap.gateway_in_flight == 5 and snap.gateway_queued == 0
    assert snap.ttft_p90_s is None and snap.itl_p90_s is None


def test_a_draining_or_restarting_replica_counts_only_what_is_still_on_it():
    # Its last /metrics scrape predates its streams moving away: counted, the 10 streams now
    # on r0 were counted twice and the fleet scaled straight back up after a scale-down.
    clock = Clock()
    gw = gateway(clock)
    add(gw, "r0", ready=True)
    add(gw, "r1", ready=True, draining=True)
    add(gw, "r2", down=True)  # exited: restarting
    gw.replicas["r0"].load.running = 10
    for rid, outstanding in (("r0", 10), ("r1", 0), ("r2", 0)):
        gw.replicas[rid].load.running = 5 if rid != "r0" else 10  # stale for r1 and r2
        gw.replicas[rid].outstanding = outstanding
    snap = controller(gw, StubSupervisor(["r0", "r1", "r2"])).snapshot()
    assert [(r.id, r.running + r.waiting) for r in snap.replicas] == [
        ("r0", 10),
        ("r1", 0),
        ("r2", 0),
    ]
    gw.replicas["r1"].outstanding = 3  # still finishing three streams there
    snap = controller(gw, StubSupervisor(["r0", "r1", "r2"])).snapshot()
    assert snap.replicas[1].running == 3


def test_recent_latencies_reach_the_policy_as_p90_over_its_window():
    clock = Clock()
    gw = gateway(clock)
    ctl = controller(gw, StubSupervisor([]), stable_window_s=10.0)
    for t, ttft in enumerate([0.1] * 8 + [2.0, 3.0]):
        gw.recent_ttft.observe(float(t), ttft)
    clock.now = 9.5
    assert ctl.snapshot().ttft_p90_s == 2.0
    clock.now = 30.0  # the window has passed
    assert ctl.snapshot().ttft_p90_s is None


def test_a_tick_hands_the_decision_to_the_supervisor_and_failed_replicas_keep_their_place():
    clock = Clock()
    gw = gateway(clock)
    add(gw, "r0", ready=True)
    add(gw, "r1", failed="crash loop")
    sup = StubSupervisor(["r0", "r1"], failed=(1,))
    ctl = controller(gw, sup, min_replicas=1, target_concurrency=1.0)
    gw.replicas["r0"].load.running = 3  # three replicas' worth: panic scale-up
    decision = ctl.tick()
    assert decision.desired > 1
    assert sup.targets == [(decision.desired + 1, (), decision.reason)]


def test_activation_at_zero_is_immediate_and_only_at_zero():
    clock = Clock()
    gw = gateway(clock)
    sup = StubSupervisor([])
    sup.serving = []
    ctl = controller(gw, sup)
    assert gw.on_starved == ctl.poke
    ctl.poke()
    assert ctl._wake.is_set()  # the loop decides now, not at its next tick
    ctl._wake.clear()
    sup.serving = [0]  # one is starting already: nothing new to decide
    ctl.poke()
    assert not ctl._wake.is_set()


def test_measured_cold_starts_replace_the_estimate_in_the_gateway_hold():
    gw = gateway(Clock())
    ctl = controller(gw, StubSupervisor([]))
    assert gw.dispatcher.cold_start_s == 12.0
    gw.on_cold_start(40.0)
    assert gw.dispatcher.cold_start_s == 40.0 and ctl.policy.scale_down_delay_s == 60.0
    gw.on_cold_start(90.0)
    assert ctl.policy.scale_down_delay_s == 90.0  # never a cooldown shorter than a cold start


# ---- options ---------------------------------------------------------------------------------


def parse(*argv: str, config: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser, tuning=False)
    add_autoscaling_arguments(parser)
    args = parser.parse_args(list(argv) + (["--gateway-config", config] if config else []))
    return args


def test_autoscaling_is_off_without_min_or_max_replicas():
    assert autoscaling_from_args(parse()) is None
    with pytest.raises(ValueError, match="need --min-replicas or --max-replicas"):
        autoscaling_from_args(parse("--target-concurrency", "8"))


def test_every_knob_is_a_flag():
    settings = autoscaling_from_args(
        parse(
            *("--min-replicas", "0", "--max-replicas", "6", "--target-concurrency", "8"),
            *("--stable-window", "30", "--panic-window-fraction", "0.2"),
            *("--panic-threshold", "3", "--max-scale-up-step", "2", "--max-scale-up-rate", "4"),
            *("--max-scale-down-step", "2", "--max-scale-down-rate", "3"),
            *("--scale-down-tolerance", "0.2", "--scale-down-delay", "90"),
            *("--scale-to-zero-grace", "45", "--ttft-slo", "0.5", "--itl-slo", "0.05"),
            *("--autoscale-interval", "2", "--cold-start-estimate", "20", "--autoscaler", "kpa"),
        )
    )
    assert settings == AutoscalingSettings(
        policy="kpa",
        interval_s=2.0,
        cold_start_estimate_s=20.0,
        config=AutoscalerConfig(
            min_replicas=0,
            max_replicas=6,
            target_concurrency=8.0,
            stable_window_s=30.0,
            panic_window_fraction=0.2,
            panic_threshold=3.0,
            max_scale_up_step=2,
            max_scale_up_rate=4.0,
            max_scale_down_step=2,
            max_scale_down_rate=3.0,
            scale_down_tolerance=0.2,
            scale_down_delay_s=90.0,
            scale_to_zero_grace_s=45.0,
            ttft_p90_slo_s=0.5,
            itl_p90_slo_s=0.05,
        ),
    )


def test_every_knob_is_a_config_key_and_flags_win(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "router: round_robin\n"
        "autoscaling:\n  min_replicas: 0\n  max_replicas: 3\n  scale_down_delay_s: 120\n"
        "  interval_s: 0.5\n  cold_start_estimate_s: 60\n  ttft_p90_slo_s: null\n"
    )
    settings = autoscaling_from_args(parse("--max-replicas", "5", config=str(path)))
    assert settings.config.min_replicas == 0 and settings.config.max_replicas == 5
    assert settings.config.scale_down_delay_s == 120 and settings.interval_s == 0.5
    assert settings.cold_start_estimate_s == 60


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        ("autoscaling:\n  min_replica: 0\n", "unknown keys \\['min_replica'\\]"),
        ("autoscaling:\n  max_replicas: '4'\n", "max_replicas must be int"),
        ("autoscaling:\n  max_replicas: true\n", "max_replicas must be int"),
        ("autoscaling: [1, 2]\n", "must be a mapping"),
        ("autoscaling:\n  max_replicas: 2\n  min_replicas: 3\n", "must be >= min_replicas"),
        ("autoscaling:\n  max_replicas: 2\n  interval_s: 0\n", "interval_s must be > 0"),
        ("autoscaling:\n  max_replicas: 2\n  policy: hpa\n", "hpa"),
    ],
)
def test_a_bad_config_key_is_named(tmp_path, yaml_text, error):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=error):
        autoscaling_from_args(parse(config=str(path)))


def test_the_initial_size_is_the_minimum_but_at_least_one():
    settings = AutoscalingSettings(config=AutoscalerConfig(min_replicas=0, max_replicas=4))
    assert settings.initial_replicas(None) == 1
    assert settings.initial_replicas(0) == 0
    assert AutoscalingSettings(config=AutoscalerConfig(min_replicas=2)).initial_replicas(None) == 2
    with pytest.raises(ValueError, match="outside"):
        settings.initial_replicas(5)


# ---- the loop on a live in-process fleet -------------------------------------------------------

fleet_of = test_fleet_scaling.fleet_of  # the fixture: fake replicas on threads, real supervisor


@pytest.mark.timeout(60)
def test_an_in_process_fleet_scales_to_zero_holds_a_request_and_comes_back(fleet_of):
    fleet = fleet_of(1)
    fleet.wait_states({"r0": "ready"})
    policy = Autoscaler(
        AutoscalerConfig(
            min_replicas=0, max_replicas=2, stable_window_s=1.0, scale_to_zero_grace_s=0.5
        )  # fmt: skip
    )
    ctl = FleetController(fleet.gw, fleet.sup, policy, interval_s=0.05, cold_start_estimate_s=30.0)
    task = fleet.front.call(lambda: fleet.front.loop.create_task(ctl.run()))
    try:
        wait_until(lambda: fleet.states() == {}, 20, what="the fleet at zero")
        assert fleet.metric("fleetserve:gateway_desired_replicas") == 0
        url = f"{fleet.front.url}/v1/completions"
        body = {"prompt": "hi", "max_tokens": 3}
        # The measured cold start (a fake replica: well under a second) is what the hold uses.
        hurried = httpx.post(url, json=body, headers={"X-Request-Timeout": "0.000001"})
        assert hurried.status_code == 503 and int(hurried.headers["Retry-After"]) >= 1
        answer = httpx.post(url, json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert (
            fleet.metric('fleetserve:gateway_scale_events_total{direction="up",reason="activate"}')
            == 1
        )
        assert (
            fleet.metric(
                'fleetserve:gateway_scale_events_total{direction="down",reason="idle_to_zero"}'
            )
            == 1
        )
    finally:
        fleet.front.call(task.cancel)


def test_the_gateway_stays_healthy_at_zero_when_its_fleet_starts_replicas_on_demand():
    from fastapi.testclient import TestClient

    from fleetserve.gateway.app import create_app

    gw = gateway(Clock())
    with TestClient(create_app(gw)) as client:
        assert client.get("/health").status_code == 503  # fixed URLs, none ready: nothing comes
        assert client.get("/health/live").status_code == 200  # but the gateway is alive
        controller(gw, StubSupervisor([]))
        answer = client.get("/health")
        assert answer.status_code == 200 and answer.json()["status"] == "scaled to zero"
        from fleetserve.gateway.replica import Replica

        gw.replicas["r0"] = Replica("r0", "http://127.0.0.1:9", loading=True)
        assert client.get("/health").json()["status"] == "replicas starting"
        gw.replicas["r0"].failed = "crash loop"  # its supervisor gave up: nothing will come
        assert client.get("/health").status_code == 503


# ---- the commands ------------------------------------------------------------------------------


def command(*argv: str) -> argparse.Namespace:
    from fleetserve.cli import build_parser

    return build_parser(list(argv)).parse_args(list(argv))


def test_serve_runs_a_fleet_for_several_replicas_or_an_autoscaler():
    from fleetserve.fleet.replicated import wants_fleet

    assert not wants_fleet(command("serve", "m.gguf"))
    assert not wants_fleet(command("serve", "m.gguf", "--replicas", "1"))
    assert wants_fleet(command("serve", "m.gguf", "--replicas", "2"))
    assert wants_fleet(command("serve", "m.gguf", "--min-replicas", "0"))
    assert wants_fleet(command("serve", "m.gguf", "--max-replicas", "3"))


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["serve", "m.gguf", "--replicas", "5", "--max-replicas", "4"], "outside"),
        (["serve", "m.gguf", "--replicas", "0"], "--replicas must be >= 1"),
        (["serve", "m.gguf", "--replicas", "2", "--drain-timeout", "nan"], "--drain-timeout"),
        (["gateway", "--backend", "local", "--drain-timeout", "nan"], "--drain-timeout"),
        (
            ["gateway", "--backend", "local", "--max-replicas", "2", "--max-scale-up-rate", "inf"],
            "finite",
        ),  # fmt: skip
        (["serve", "m.gguf", "--min-replicas", "3", "--max-replicas", "2"], "min_replicas"),
        (["serve", "m.gguf", "--max-replicas", "2", "--scale-down-delay", "-1"], ">= 0"),
        (["gateway"], "give one of --replica URL"),
        (["gateway", "--replica", "http://127.0.0.1:1", "--backend", "local"], "give one of"),
        (["gateway", "--replica", "http://127.0.0.1:1", "--model", "m"], "--model needs"),
        (["gateway", "--replica", "http://127.0.0.1:1", "--min-replicas", "0"], "needs --backend"),
        (["gateway", "--backend", "local", "--replicas", "0"], "--replicas must be >= 1"),
        (["gateway", "--backend", "local", "--replicas", "3", "--max-replicas", "2"], "outside"),
    ],
)
def test_bad_fleet_flags_are_refused_with_what_is_wrong(argv, error, capsys):
    args = command(*argv)
    with pytest.raises(SystemExit) as exit_:
        args.func(args)
    assert exit_.value.code == 2
    assert error in capsys.readouterr().err


def test_a_request_refused_at_zero_still_brings_a_replica():
    # Its deadline was sooner than a cold start, so it got 503 and was never queued: without
    # counting it the fleet would stay at zero and its retry would be refused again, forever.
    clock = Clock()
    gw = gateway(clock)
    sup = StubSupervisor([])
    sup.serving = []
    ctl = controller(gw, sup)
    assert ctl.tick().desired == 0
    gw.turned_away = 1
    clock.now = 1.0
    decision = ctl.tick()
    assert (decision.desired, decision.reason) == (1, "activate")
    assert gw.turned_away == 0  # counted once


def test_the_gateway_counts_and_reports_a_request_it_refuses_at_zero():
    from fleetserve.gateway.gateway import NoReplica
    from fleetserve.gateway.route_request import RouteRequest

    clock = Clock()
    gw = gateway(clock)
    pokes = []
    gw.dispatcher.cold_start_s = 30.0
    gw.on_starved = lambda: pokes.append(clock.now)
    with pytest.raises(NoReplica) as refused:
        asyncio.run(gw.acquire(RouteRequest("a"), deadline=5.0))
    assert refused.value.retry_after_s >= 30.0
    assert gw.turned_away == 1 and pokes == [0.0]
