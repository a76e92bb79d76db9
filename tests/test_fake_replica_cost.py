"""The fake replica's engine-like cost: one step clock per replica, a step costs
`token_delay + per_seq x running`, and `--load-delay` keeps /health at 503. The clock runs on
an injected sleep that records each step's duration, so nothing here waits on wall time."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fleetserve.testing.fake_replica import (
    FakeReplica,
    FakeSettings,
    StepClock,
    next_token,
    parse_args,
)


class RecordingSleep:
    """Stands in for asyncio.sleep: records the duration, then lets the streams run (a few
    loop turns, so each has asked for the next step before this one ends)."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.durations.append(seconds)
        for _ in range(20):
            await asyncio.sleep(0)


def _replica(token_delay: float, per_seq: float) -> tuple[FakeReplica, RecordingSleep]:
    replica = FakeReplica(FakeSettings(token_delay_s=token_delay, per_seq_s=per_seq))
    sleep = RecordingSleep()
    replica.clock = StepClock(lambda: replica.running, replica.step_cost, sleep=sleep)
    return replica, sleep


async def _generate(replica: FakeReplica, prompt: str, max_tokens: int) -> list[int]:
    ids = []
    async for new, _, _ in replica.generate(list(prompt.encode()), max_tokens, ()):
        ids += new
    return ids


def _expected(prompt: str, max_tokens: int) -> list[int]:
    seq = list(prompt.encode())
    for _ in range(max_tokens):
        seq.append(next_token(seq))
    return seq[len(prompt.encode()) :]


def test_step_cost_grows_with_the_streams_running():
    replica = FakeReplica(FakeSettings(token_delay_s=0.02, per_seq_s=0.005))
    assert replica.step_cost(1) == pytest.approx(0.025)
    assert replica.step_cost(8) == pytest.approx(0.06)


def test_streams_share_one_step_clock_and_pay_for_each_other():
    replica, sleep = _replica(token_delay=0.02, per_seq=0.005)

    async def run():
        return await asyncio.gather(
            _generate(replica, "a", 2), _generate(replica, "b", 4), _generate(replica, "c", 4)
        )

    tokens = asyncio.run(run())
    assert tokens == [_expected("a", 2), _expected("b", 4), _expected("c", 4)]
    # Lock step: 4 steps for 4 tokens; three streams in the first two, two in the last two.
    assert sleep.durations == pytest.approx([0.035, 0.035, 0.03, 0.03])
    assert replica.clock.steps == 4
    assert replica.running == 0


def test_a_cancelled_stream_leaves_the_clock_running_for_the_others():
    replica, sleep = _replica(token_delay=0.01, per_seq=0.01)

    async def run():
        short = asyncio.create_task(_generate(replica, "x", 100))
        long = asyncio.create_task(_generate(replica, "y", 5))
        while len(sleep.durations) < 2:
            await asyncio.sleep(0)
        short.cancel()
        return await long

    assert asyncio.run(run()) == _expected("y", 5)
    assert sleep.durations[0] == pytest.approx(0.03)
    assert sleep.durations[-1] == pytest.approx(0.02)  # the cancelled stream no longer counts
    assert replica.aborted == 1


def test_without_a_per_sequence_cost_streams_keep_their_own_delay():
    replica, sleep = _replica(token_delay=0.0, per_seq=0.0)

    async def run():
        return await asyncio.gather(_generate(replica, "a", 3), _generate(replica, "b", 3))

    assert asyncio.run(run()) == [_expected("a", 3), _expected("b", 3)]
    assert sleep.durations == [] and replica.clock.steps == 0


def test_health_is_503_while_loading():
    replica = FakeReplica(FakeSettings(load_delay_s=3600))

    async def health() -> int:
        transport = httpx.ASGITransport(app=replica.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
            return (await client.get("/health")).status_code

    assert asyncio.run(health()) == 503
    replica.ready_at = 0.0  # loaded
    assert asyncio.run(health()) == 200


def test_command_line_flags_reach_the_settings():
    _, settings = parse_args(
        ["--port", "1", "--token-delay", "0.02", "--per-seq-delay", "0.004", "--load-delay", "3"]
    )
    assert (settings.token_delay_s, settings.per_seq_s, settings.load_delay_s) == (0.02, 0.004, 3)
    _, default = parse_args(["--port", "1"])
    assert default.per_seq_s == 0.0 and default.load_delay_s == 0.0
