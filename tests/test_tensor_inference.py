"""`inference.infer`'s outcome counts with a fake state: each request is counted once, under
the way it ended."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fleetserve.server.metrics import PREFIX
from fleetserve.tensor.inference import infer
from fleetserve.tensor.metrics import TensorMetrics


class FakeState:
    """What `infer` uses of a `TensorState`; its workers answer when `answer` is set."""

    settings = SimpleNamespace(allow_client_priority=False)

    def __init__(self) -> None:
        self.metrics = TensorMetrics("m", lambda: (0, 0))
        self.handler = SimpleNamespace(
            key=lambda rows: "k", inline_preprocess=False, inline_postprocess=False
        )
        self.workers = self
        self.in_flight = 0
        self.queued = asyncio.Event()
        self.answer = asyncio.Event()

    def check_ready(self) -> None:
        pass

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    async def infer(self, rows: list, key, priority: int, gone=None) -> list:
        self.queued.set()
        await self.answer.wait()
        return [2 * r for r in rows]

    def finished(self) -> dict[str, float]:
        return {
            s.labels["finished_reason"]: s.value
            for family in self.metrics.registry.collect()
            if family.name == PREFIX + "request_success"
            for s in family.samples
            if s.name.endswith("_total")
        }


def test_a_request_whose_client_left_is_counted_cancelled_not_ok():
    async def main():
        state = FakeState()
        task = asyncio.ensure_future(infer(state, lambda: [1], lambda outputs: outputs))
        await state.queued.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return state

    state = asyncio.run(main())
    assert state.finished() == {"cancelled": 1.0}
    assert state.in_flight == 0


def test_answered_and_failed_requests_are_counted_ok_and_error():
    def broken(outputs):
        raise RuntimeError("a bug in postprocessing")

    async def main():
        state = FakeState()
        state.answer.set()
        assert await infer(state, lambda: [1], lambda outputs: outputs) == ([2], [1])
        with pytest.raises(RuntimeError):
            await infer(state, lambda: [1], broken)
        return state

    assert asyncio.run(main()).finished() == {"ok": 1.0, "error": 1.0}
