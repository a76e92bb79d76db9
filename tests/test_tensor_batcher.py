"""The dynamic batcher's policy with plain data and a fake clock; the workers around it with
a fake handler (no model)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from fleetserve.tensor.batcher import BatchConfig, BatchQueue, Pending, QueueFull, TooLarge
from fleetserve.tensor.workers import (
    ClientLeft,
    ModelRefused,
    QueueTimeout,
    WorkerError,
    Workers,
)


def req(rows=1, key="k", at=0.0, priority=0, timeout=10.0, name=None) -> Pending:
    return Pending(rows, key, at, at + timeout, priority, payload=name)


def names(batch) -> list:
    return [r.payload for r in batch]


def test_a_free_worker_takes_what_waits_with_no_delay():
    q = BatchQueue(BatchConfig(max_batch_size=4))
    assert q.next_batch(0.0) is None
    q.submit(req(name="a"))
    q.submit(req(rows=2, name="b"))
    assert names(q.next_batch(0.0)) == ["a", "b"]
    assert len(q) == 0 and q.num_rows == 0


def test_ties_in_arrival_keep_the_order_of_submission_in_each_queue():
    made_first, made_second = req(name="b"), req(name="a")  # same priority and arrival
    q = BatchQueue(BatchConfig(max_batch_size=4))
    q.submit(made_second)
    q.submit(made_first)
    assert names(q.next_batch(0.0)) == ["a", "b"]
    other = BatchQueue(BatchConfig(max_batch_size=4))
    other.submit(req(name="c"))
    assert [r.seq for r in (made_second, made_first)] == [0, 1]
    assert other.next_batch(0.0)[0].seq == 0  # each queue counts its own


def test_batches_fill_to_max_rows_without_splitting_a_request():
    q = BatchQueue(BatchConfig(max_batch_size=4))
    for name, rows in (("a", 2), ("b", 1), ("c", 2), ("d", 1)):
        q.submit(req(rows=rows, name=name, at=0.0))
    # c does not fit after a+b (5 rows); the batch stops at the first that does not fit,
    # so FIFO order is never overtaken by a smaller later request.
    assert names(q.next_batch(0.0)) == ["a", "b"]
    assert names(q.next_batch(0.0)) == ["c", "d"]


def test_queue_delay_waits_for_a_fuller_batch_until_the_head_is_due():
    q = BatchQueue(BatchConfig(max_batch_size=3, max_queue_delay_s=0.010))
    q.submit(req(name="a", at=1.000))
    assert q.next_batch(1.004) == pytest.approx(1.010)  # ask again then
    q.submit(req(name="b", at=1.005))
    assert q.next_batch(1.006) == pytest.approx(1.010)
    assert names(q.next_batch(1.010)) == ["a", "b"]
    # a full batch goes at once, delay or not
    for name in "cde":
        q.submit(req(name=name, at=2.0))
    assert names(q.next_batch(2.0)) == ["c", "d", "e"]


def test_only_requests_of_the_heads_bucket_share_its_batch():
    q = BatchQueue(BatchConfig(max_batch_size=8))
    q.submit(req(key=16, name="short1", at=0.0))
    q.submit(req(key=64, name="long", at=0.1))
    q.submit(req(key=16, name="short2", at=0.2))
    assert names(q.next_batch(1.0)) == ["short1", "short2"]
    assert names(q.next_batch(1.0)) == ["long"]


def test_priority_goes_first_then_arrival_order():
    q = BatchQueue(BatchConfig(max_batch_size=1))
    q.submit(req(name="old-low", at=0.0, priority=5))
    q.submit(req(name="new-high", at=1.0, priority=-1))
    q.submit(req(name="mid", at=0.5))
    order = [names(q.next_batch(2.0))[0] for _ in range(3)]
    assert order == ["new-high", "mid", "old-low"]


def test_bounded_queue_refuses_when_full_and_too_large_always():
    q = BatchQueue(BatchConfig(max_batch_size=4, max_queue_rows=6))
    q.submit(req(rows=4))
    q.submit(req(rows=2))
    with pytest.raises(QueueFull):
        q.submit(req(rows=1))
    with pytest.raises(TooLarge):
        q.submit(req(rows=5))
    q.next_batch(0.0)  # 4 rows leave
    q.submit(req(rows=1))
    assert q.num_rows == 3


def test_expired_requests_leave_and_cancelled_ones_are_gone():
    q = BatchQueue(BatchConfig(max_batch_size=4))
    late = req(name="late", at=0.0, timeout=1.0)
    gone = req(name="gone", at=0.0)
    q.submit(late)
    q.submit(gone)
    q.submit(req(name="ok", at=0.5, timeout=5.0))
    assert q.pop_expired(0.9) == []
    assert names(q.pop_expired(1.0)) == ["late"]
    assert q.cancel(gone) and not q.cancel(gone)
    assert names(q.next_batch(1.0)) == ["ok"]
    assert q.num_rows == 0


def test_the_wake_time_is_never_past_the_heads_deadline():
    q = BatchQueue(BatchConfig(max_batch_size=4, max_queue_delay_s=5.0))
    q.submit(req(at=0.0, timeout=1.0))
    assert q.next_batch(0.0) == pytest.approx(1.0)


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_rows"):
        BatchConfig(max_batch_size=8, max_queue_rows=4)
    with pytest.raises(ValueError, match="delay"):
        BatchConfig(max_queue_delay_s=-1)


class FakeHandler:
    """Doubles each row; refuses a row of -1 (a model error on that input alone). `gate`
    holds the first batch until the test lets it go, so later requests queue up."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.gate = threading.Event()

    def predict(self, rows: list) -> list:
        self.gate.wait(10)
        self.batches.append(list(rows))
        if -1 in rows:
            raise RuntimeError("shape mismatch: cannot take -1\nmore detail")
        return [2 * r for r in rows]


def test_workers_batch_while_busy_and_isolate_a_bad_request():
    handler = FakeHandler()
    workers = Workers(handler, BatchConfig(max_batch_size=8))
    workers.start()

    async def main():
        first = asyncio.ensure_future(workers.infer([1], "k"))
        while not workers.load()[0]:  # the first batch runs (held at the gate)
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(workers.infer([v, v + 1], "k")) for v in (10, 20)]
        bad = asyncio.ensure_future(workers.infer([-1], "k"))
        while workers.load()[1] < 3:
            await asyncio.sleep(0.001)
        handler.gate.set()
        results = await asyncio.gather(first, *rest)
        with pytest.raises(ModelRefused, match="shape mismatch: cannot take -1$"):
            await bad
        return results

    try:
        results = asyncio.run(main())
    finally:
        workers.stop()
    assert results == [[2], [20, 22], [40, 42]]
    assert handler.batches[0] == [1]
    assert handler.batches[1] == [10, 11, 20, 21, -1]  # one batch while the first ran
    assert handler.batches[2:] == [[10, 11], [20, 21], [-1]]  # then each alone


def test_a_request_waiting_past_its_deadline_gets_queue_timeout():
    handler = FakeHandler()
    now = [0.0]
    workers = Workers(handler, BatchConfig(max_batch_size=1, timeout_s=5.0), clock=lambda: now[0])
    workers.start()

    async def main():
        first = asyncio.ensure_future(workers.infer([1], "k"))
        while not workers.load()[0]:
            await asyncio.sleep(0.001)
        late = asyncio.ensure_future(workers.infer([2], "k"))
        while workers.load()[1] < 1:
            await asyncio.sleep(0.001)
        now[0] = 6.0
        handler.gate.set()
        assert await first == [2]
        with pytest.raises(QueueTimeout):
            await late

    try:
        asyncio.run(main())
    finally:
        workers.stop()
    assert handler.batches == [[1]]


class ShortHandler:
    """Doubles each row, but its first batch gets one output too few: the worker's own check
    fails after `predict` returned, outside the model's errors."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, rows: list) -> list:
        self.calls += 1
        outputs = [2 * r for r in rows]
        return outputs[:-1] if self.calls == 1 else outputs


def test_a_worker_failing_outside_the_model_fails_its_batch_and_serves_the_next():
    workers = Workers(ShortHandler(), BatchConfig(max_batch_size=8))
    workers.start()

    async def main():
        with pytest.raises(WorkerError):  # wait_for only guards against a hang
            await asyncio.wait_for(workers.infer([1, 2], "k"), 30)
        return await asyncio.wait_for(workers.infer([3], "k"), 30)

    try:
        assert asyncio.run(main()) == [6]
        assert workers.alive()
    finally:
        workers.stop()


def test_a_request_whose_client_left_while_queued_never_runs():
    handler = FakeHandler()
    workers = Workers(handler, BatchConfig(max_batch_size=8))
    workers.start()

    async def main():
        first = asyncio.ensure_future(workers.infer([1], "k"))
        while not workers.load()[0]:  # the first batch runs (held at the gate)
            await asyncio.sleep(0.001)
        gone = asyncio.get_running_loop().create_future()
        left = asyncio.ensure_future(workers.infer([5], "k", gone=gone))
        stays = asyncio.ensure_future(workers.infer([7], "k"))
        while workers.load()[1] < 2:
            await asyncio.sleep(0.001)
        gone.set_result(None)  # the client of [5] disconnects
        with pytest.raises(ClientLeft):
            await left
        assert workers.load()[1] == 1  # out of the queue at once, not when a worker looks
        handler.gate.set()
        return await first, await stays

    try:
        assert asyncio.run(main()) == ([2], [14])
    finally:
        workers.stop()
    assert handler.batches == [[1], [7]]


class SlowBarrierHandler:
    """Doubles each row; every batch waits at a two-party barrier, so a batch finishes only
    while another instance runs one too, and records the thread that ran it."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=20)
        self.threads: list[str] = []
        self.cores: dict[str, set[int]] = {}

    def predict(self, rows: list) -> list:
        name = threading.current_thread().name
        self.threads.append(name)
        self.cores[name] = os.sched_getaffinity(0)  # this thread's
        self.barrier.wait()
        return [2 * r for r in rows]


def test_two_instances_run_batches_side_by_side_with_correct_answers():
    handler = SlowBarrierHandler()
    workers = Workers(handler, BatchConfig(max_batch_size=1), instances=2)
    workers.start()

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(workers.infer([v], "k") for v in range(6))), 30
        )

    try:
        results = asyncio.run(main())
    finally:
        workers.stop()
    assert results == [[2 * v] for v in range(6)]
    assert sorted(set(handler.threads)) == ["fleetserve-model-0", "fleetserve-model-1"]
    assert workers.batches_run == [3, 3]
    cores = os.sched_getaffinity(0)
    if len(cores) >= 2:  # each instance pinned to its own half of the cores
        first, second = handler.cores.values()
        assert first and second and not first & second and first | second == cores
