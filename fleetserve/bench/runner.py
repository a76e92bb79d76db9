"""The asyncio load loop: starts sessions on their schedule, caps concurrency, stops on count
or duration, and collects one `RequestResult` per request.

Timing contract: the schedule (arrival times) and the sessions are made before t0, so nothing
but sending and receiving happens on the clock. A session due at time a starts at t0 + a, or
later if `concurrency` sessions are already in flight (its `scheduled_s` stays a, so the lag is
visible). Sessions in flight when the duration ends are allowed to finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from fleetserve.bench.client import StreamingClient
from fleetserve.bench.config import TargetConfig
from fleetserve.bench.payload import build_body, build_input
from fleetserve.bench.result import RequestResult
from fleetserve.bench.workload import Session

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What to run. `arrivals[i]` is the start time of `sessions[i]`; None means a closed loop
    (each session starts as soon as a concurrency slot is free; with `ramp_up_s`, session i of
    the first `concurrency` not before i * ramp_up_s / concurrency)."""

    sessions: Iterable[Session]
    arrivals: list[float] | None
    concurrency: int | None = None
    duration_s: float | None = None
    ramp_up_s: float = 0.0


@dataclass
class RunOutcome:
    results: list[RequestResult]
    duration_s: float  # from t0 until the last request ended


class Runner:
    """Runs one `Plan` against one target. `on_result` is called as each request ends."""

    def __init__(
        self,
        target: TargetConfig,
        http: httpx.AsyncClient,
        on_result: Callable[[RequestResult], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.target = target
        self.http = http
        self.on_result = on_result
        self.clock = clock

    async def run(self, plan: Plan) -> RunOutcome:
        t0 = self.clock()
        client = StreamingClient(self.http, self.target, t0, self.clock)
        results: list[RequestResult] = []
        slots = asyncio.Semaphore(plan.concurrency) if plan.concurrency else None
        tasks: set[asyncio.Task] = set()

        def expired() -> bool:
            return plan.duration_s is not None and client.now() >= plan.duration_s

        for i, session in enumerate(plan.sessions):
            if plan.arrivals is not None:
                if i >= len(plan.arrivals):
                    break
                due = plan.arrivals[i]
                if due > client.now():
                    await asyncio.sleep(due - client.now())
            elif plan.ramp_up_s and plan.concurrency and i < plan.concurrency:
                ramp = i * plan.ramp_up_s / plan.concurrency
                if ramp > client.now():
                    await asyncio.sleep(ramp - client.now())
            if slots is not None:
                await slots.acquire()
            if plan.arrivals is None:
                due = client.now()
            if expired():
                if slots is not None:
                    slots.release()
                break
            task = asyncio.create_task(
                self._run_session(client, session, due, results, expired, slots)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        end = max((r.end_s for r in results), default=client.now())
        return RunOutcome(sorted(results, key=lambda r: r.index), end)

    async def _run_session(
        self,
        client: StreamingClient,
        session: Session,
        due: float,
        results: list[RequestResult],
        expired: Callable[[], bool],
        slots: asyncio.Semaphore | None,
    ) -> None:
        history: list[tuple[str, str]] = []
        try:
            for turn_index, turn in enumerate(session.turns):
                if turn_index > 0 and expired():
                    break
                request_input = build_input(
                    self.target.endpoint, session.system, history, turn.text
                )
                result = RequestResult(
                    index=len(results),
                    session=session.index,
                    turn=turn_index,
                    input_len=turn.input_len,
                    output_len=turn.output_len,
                    scheduled_s=due,
                    group=session.group,
                    request_input=request_input,
                )
                results.append(result)
                body = build_body(self.target, request_input, turn.output_len)
                await client.send(body, result)
                if self.on_result is not None:
                    self.on_result(result)
                if not result.ok:
                    logger.debug("request %d failed: %s", result.index, result.error_detail)
                    break  # a conversation does not go on without its answer
                history.append((turn.text, result.text))
                due = result.end_s
        finally:
            if slots is not None:
                slots.release()
