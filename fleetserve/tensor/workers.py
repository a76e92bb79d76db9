"""Model instances as threads around the batcher's queue (`batcher.BatchQueue`).

Each worker thread asks the queue for a batch whenever it is free, runs the handler's
`predict` on the rows of the whole batch (torch releases the GIL in its kernels, so the event
loop keeps accepting requests meanwhile), and hands each request its own rows' outputs. With
`instances` > 1 the CPU cores are split between them: each worker pins itself to its share
and sets torch's thread count for the kernels it starts.

A request waits on an asyncio future of its own loop; a worker hands a whole batch's outputs
to that loop in one `call_soon_threadsafe` (one wake-up per batch, not one per request). A
request whose client left (`gone`) leaves the queue at once and never runs.

Deadlines are checked whenever a worker looks for work: with every worker busy, a request
past its deadline leaves when the first of them is done.

On 2 cores one instance with torch's 2 threads served more than two pinned instances of one
thread each at 64 clients (the instances contend for the GIL and for the cores the event loop
needs), and less at one client (`benchmarks/README.md`); `--instances` pays on more cores.

A batch that the model refuses (a shape it cannot take, say) is run again one request at a
time, so that one bad request fails alone and never takes its batch-mates with it. Anything
else that goes wrong while a batch runs (a bug) fails every request of the batch still
unanswered, and the worker goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable

import torch

from fleetserve.tensor.batcher import BatchConfig, BatchQueue, Pending
from fleetserve.tensor.handlers import Handler
from fleetserve.tensor.metrics import TensorMetrics

logger = logging.getLogger(__name__)


class QueueTimeout(Exception):
    """The request waited past its deadline (HTTP 503)."""


class ModelRefused(Exception):
    """The model raised on this request's input alone (HTTP 400)."""


class WorkerError(Exception):
    """The worker failed on this request's batch outside the model: a bug (HTTP 500)."""


class ClientLeft(Exception):
    """The client disconnected before its request ran; the request never will."""


class Workers:
    """`instances` threads running `handler` over batches; `infer` is the async door."""

    def __init__(
        self,
        handler: Handler,
        config: BatchConfig,
        metrics: TensorMetrics | None = None,
        instances: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self.handler = handler
        self.config = config
        self.metrics = metrics
        self.instances = instances
        self.clock = clock
        self.queue = BatchQueue(config)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._running: dict[int, tuple[float, int]] = {}  # worker -> (batch start, requests)
        self.batches_run = [0] * instances  # batches each instance has finished

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        for i in range(self.instances):
            share = cores[i :: self.instances] if self.instances > 1 else None
            thread = threading.Thread(
                target=self._loop, args=(i, share), name=f"fleetserve-model-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def oldest_batch_age(self) -> float:
        """Seconds the longest-running batch has run (0 when none runs)."""
        now = self.clock()
        with self._cond:
            return max((now - start for start, _ in self._running.values()), default=0.0)

    def load(self) -> tuple[int, int]:
        """(requests in a running batch, requests waiting)."""
        with self._cond:
            return sum(n for _, n in self._running.values()), len(self.queue)

    # ---- the door ---------------------------------------------------------------------------

    async def infer(
        self,
        rows: list,
        key: Hashable,
        priority: int = 0,
        gone: asyncio.Future | None = None,
    ) -> list:
        """The outputs of `rows` (one per row), once a worker has run them in some batch.
        Raises `QueueFull`/`TooLarge` at once, `QueueTimeout` after the deadline,
        `ModelRefused` if the model raises on these rows alone, and `ClientLeft` when `gone`
        (the client's disconnect) finishes first: a request still queued then never runs."""
        now = self.clock()
        future = asyncio.get_running_loop().create_future()
        request = Pending(
            num_rows=len(rows),
            key=key,
            arrival=now,
            deadline=now + self.config.timeout_s,
            priority=priority,
            payload=(rows, future),
        )
        with self._cond:
            self.queue.submit(request)
            self._cond.notify()
        if gone is not None:
            gone.add_done_callback(lambda _: future.cancel())
        try:
            return await future
        except asyncio.CancelledError:  # the client left: free its place if it still waits
            with self._cond:
                self.queue.cancel(request)
            if gone is not None and gone.done() and not _cancelling():
                raise ClientLeft("the client closed the connection") from None
            raise

    # ---- the worker -------------------------------------------------------------------------

    def _loop(self, index: int, cores: list[int] | None) -> None:
        if cores:
            os.sched_setaffinity(0, cores)  # this thread only (Linux)
            torch.set_num_threads(len(cores))
        while True:
            batch = self._next(index)
            if batch is None:
                return
            outcomes: dict[Pending, object] = {}  # request -> its outputs or its exception
            try:
                self._run(batch, outcomes)
            except Exception:
                logger.exception("a model worker failed outside the model on a batch")
            finally:  # no request is left waiting forever
                failed = WorkerError("the server failed on this batch (see its log)")
                with self._cond:
                    del self._running[index]
                    self.batches_run[index] += 1
                _deliver([(r, outcomes.get(r, failed)) for r in batch])

    def _next(self, index: int) -> list[Pending] | None:
        with self._cond:
            while not self._stopping:
                now = self.clock()
                expired = self.queue.pop_expired(now)
                if expired:
                    _deliver(
                        [
                            (r, QueueTimeout(f"waited {now - r.arrival:.1f} s in queue"))
                            for r in expired
                        ]
                    )
                    for _ in expired:
                        self._count("timeout")
                decision = self.queue.next_batch(now)
                if isinstance(decision, list):
                    self._running[index] = (now, len(decision))
                    return decision
                self._cond.wait(None if decision is None else max(0.0, decision - now))
            return None

    def _run(self, batch: list[Pending], outcomes: dict[Pending, object]) -> None:
        """Runs `batch`, filling `outcomes` with each request's outputs or exception."""
        start = self.clock()
        rows = [row for request in batch for row in request.payload[0]]
        try:
            outputs = self.handler.predict(rows)
        except Exception as exc:  # noqa: BLE001 - the model's error, whatever it is
            if len(batch) > 1:
                for request in batch:  # find the culprit: each request alone
                    self._run([request], outcomes)
                return
            logger.info("the model refused a request: %s", exc)
            outcomes[batch[0]] = ModelRefused(_first_line(exc))
            self._count("bad_input")
            return
        assert len(outputs) == len(rows), "predict must give one output per row"
        if self.metrics is not None:
            name = self.metrics.model_name
            self.metrics.batch_size.labels(name).observe(len(rows))
            self.metrics.inference.labels(name).observe(self.clock() - start)
            for request in batch:
                self.metrics.queue.labels(name).observe(start - request.arrival)
        offset = 0
        for request in batch:
            outcomes[request] = outputs[offset : offset + request.num_rows]
            offset += request.num_rows

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels(self.metrics.model_name, reason).inc()


def _deliver(outcomes: list[tuple[Pending, object]]) -> None:
    """Hands each request its outputs (or exception) on its event loop: one wake-up of each
    loop for the whole batch, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for request, outcome in outcomes:
        future: asyncio.Future = request.payload[1]
        by_loop.setdefault(future.get_loop(), []).append((future, outcome))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


def _settle(items: list[tuple[asyncio.Future, object]]) -> None:
    """On the loop: each future gets its outcome, unless its client left (cancelled)."""
    for future, outcome in items:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not just a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
