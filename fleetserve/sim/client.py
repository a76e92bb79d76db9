"""`SimClient`: `fleetserve bench`'s load loop on the virtual clock.

The same `Plan` (sessions and arrival times from `bench.benchmark.make_plan`, so the same
flags and seed give the same workload) and the same rules as `bench.runner.Runner`: a
session starts at its arrival, or when a `concurrency` slot frees (its `scheduled_s` stays
its arrival); a closed loop starts the next session when one ends (ramped up over
`ramp_up_s`); no new session, and no further turn, once `duration_s` has passed; turn k+1 of
a conversation is sent when turn k's answer has arrived, and a failed turn ends its session.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from fleetserve.bench.result import RequestResult
from fleetserve.bench.runner import Plan
from fleetserve.bench.workload import Session
from fleetserve.sim.events import EventLoop
from fleetserve.sim.gateway import SimGateway, SimStream
from fleetserve.sim.prompts import PromptBuilder


class SimClient:
    def __init__(
        self,
        loop: EventLoop,
        gateway: SimGateway,
        plan: Plan,
        prompts: PromptBuilder,
        on_result: Callable[[RequestResult], None] | None = None,
    ) -> None:
        self.loop = loop
        self.gateway = gateway
        self.plan = plan
        self.prompts = prompts
        self.on_result = on_result
        self.results: list[RequestResult] = []
        self.in_flight = 0  # sessions
        self._sessions: Iterator[Session] = iter(plan.sessions)
        self._backlog: deque[tuple[Session, float]] = deque()
        self._ids: dict[str, list[int]] = {}
        self._stopped = False

    @property
    def active(self) -> bool:
        """Whether sessions are still running or due."""
        return not self._stopped or self.in_flight > 0

    def _expired(self) -> bool:
        d = self.plan.duration_s
        return d is not None and self.loop.now >= d

    def start(self) -> None:
        plan = self.plan
        if plan.arrivals is not None:
            for arrival in plan.arrivals:
                self.loop.call_at(arrival, self._arrive, next(self._sessions), arrival)
            self.loop.call_at(plan.arrivals[-1] if plan.arrivals else 0.0, self._last_arrival)
            return
        first = plan.concurrency if plan.concurrency else None
        started = 0
        for session in self._sessions:
            ramp = 0.0
            if plan.ramp_up_s and plan.concurrency:
                ramp = started * plan.ramp_up_s / plan.concurrency
            self.loop.call_at(ramp, self._start_due_now, session)
            started += 1
            if first is not None and started == first:
                return
        self._stopped = True

    def _last_arrival(self) -> None:
        self._stopped = True

    def _arrive(self, session: Session, due: float) -> None:
        if self._expired():
            self._stopped = True
            return
        if self.plan.concurrency and self.in_flight >= self.plan.concurrency:
            self._backlog.append((session, due))
            return
        self._start(session, due)

    def _start_due_now(self, session: Session) -> None:
        if self._expired():
            self._stopped = True
            return
        self._start(session, self.loop.now)

    def _start(self, session: Session, due: float) -> None:
        self.in_flight += 1
        self._send(session, 0, due, None)

    def _encode(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = self.prompts.encode(text) if text else []
        return ids

    def _send(self, session: Session, turn: int, due: float, previous: SimStream | None):
        spec = session.turns[turn]
        question = self.prompts.encode(spec.text)
        if previous is None:
            prompt = self.prompts.first_prompt(self._encode(session.system), question)
        else:
            prompt = self.prompts.next_prompt(previous.prompt_ids, previous.output_ids, question)
        result = RequestResult(
            index=len(self.results),
            session=session.index,
            turn=turn,
            input_len=spec.input_len,
            output_len=spec.output_len,
            scheduled_s=due,
            group=session.group,
            start_s=self.loop.now,
        )
        self.results.append(result)
        stream = SimStream(
            f"s{session.index}-t{turn}",
            result,
            prompt,
            spec.output_len,
            lambda s: self.loop.call_at(self.loop.now, self._turn_done, session, s),
        )
        self.gateway.send(stream)

    def _turn_done(self, session: Session, stream: SimStream) -> None:
        if self.on_result is not None:
            self.on_result(stream.result)
        turn = stream.result.turn + 1
        if stream.result.ok and turn < len(session.turns) and not self._expired():
            self._send(session, turn, self.loop.now, stream)
            return
        self.in_flight -= 1
        if self.plan.arrivals is not None:
            while self._backlog and self.in_flight < (self.plan.concurrency or 0):
                waiting, due = self._backlog.popleft()
                if self._expired():
                    self._backlog.clear()
                    break
                self._start(waiting, due)
            return
        if self.plan.concurrency and not self._stopped:
            following = next(self._sessions, None)
            if following is None or self._expired():
                self._stopped = True
                return
            self._start(following, self.loop.now)
