"""`AsyncEngine`: the API server's handle on an engine core running in its own process.

Tokenization, detokenization, stop strings and n > 1 fan-out happen here (the
`OutputProcessor`); the core process only sees token ids (see `core_proc` for the wire
format). One asyncio task reads the core's ticks and hands each request's output to the
coroutine streaming it. If the core process dies, every in-flight `generate` raises
`EngineDeadError`, `check_health()` turns false and `dead` is set, so that the server can exit
and a supervisor restart the replica.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from fleetserve.engine import core_proc, ipc_dir
from fleetserve.engine.config import EngineConfig
from fleetserve.engine.outputs import RequestOutput
from fleetserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 20.0  # a core silent for longer is reported unhealthy (a step can be slow)
POLL_S = 0.25  # how often the reader checks that the core process is alive
KV_EVENT_QUEUE = 4096  # batches a KV-event subscriber may fall behind before it is dropped


class EngineDeadError(RuntimeError):
    """The engine core process is gone (or was never started); nothing can be generated."""


class EngineStartError(RuntimeError):
    """The engine core could not load the model."""


class RequestFailedError(RuntimeError):
    """The engine ended one request with an error (the engine itself lives on)."""


@dataclass
class RequestMetrics:
    """Timings of one finished request, for histograms. Times are `time.monotonic()`."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float
    queue_time: float | None  # waiting in the core before its first schedule
    num_prompt_tokens: int
    num_generation_tokens: int
    finish_reason: str | None


class _Stream:
    """Outputs of one request on their way to its consumer. A consumer that falls behind gets
    the updates merged into one (deltas concatenated) instead of a growing backlog."""

    def __init__(self, arrival_time: float, num_prompt_tokens: int) -> None:
        self.arrival_time = arrival_time
        self.num_prompt_tokens = num_prompt_tokens
        self.first_token_time: float | None = None
        self.queue_time: float | None = None
        self.child_ids: list[str] = []
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        if self._pending is not None:
            for old, new in zip(self._pending.outputs, out.outputs, strict=True):
                new.text_delta = old.text_delta + new.text_delta
                new.token_ids_delta = old.token_ids_delta + new.token_ids_delta
                if old.logprobs_delta:
                    new.logprobs_delta = old.logprobs_delta + (new.logprobs_delta or [])
        self._pending = out
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def get(self) -> RequestOutput:
        while self._pending is None and self._error is None:
            await self._event.wait()
        self._event.clear()
        if self._pending is not None:
            out, self._pending = self._pending, None
            return out
        raise self._error


class KVEventSubscription:
    """Batches of KV events (dicts, see `core_proc.kv_event_to_dict`) as they leave the core.
    Ends when the engine stops, or when this subscriber falls `KV_EVENT_QUEUE` batches behind
    (it has then missed events: reconnect and rebuild from empty)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queue: asyncio.Queue[list[dict] | None] = asyncio.Queue(KV_EVENT_QUEUE)
        self.closed = False

    def _put(self, events: list[dict]) -> None:
        try:
            self._queue.put_nowait(events)
        except asyncio.QueueFull:
            logger.warning("a KV-event subscriber fell behind; closing its stream")
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._engine._subscribers.discard(self)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def __aiter__(self) -> KVEventSubscription:
        return self

    async def __anext__(self) -> list[dict]:
        if self.closed and self._queue.empty():
            raise StopAsyncIteration
        batch = await self._queue.get()
        if batch is None:
            raise StopAsyncIteration
        return batch


class AsyncEngine:
    def __init__(
        self,
        config: EngineConfig,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        log_level: int | None = None,
    ) -> None:
        self.config = config
        self.health_timeout_s = health_timeout_s
        self.log_level = log_level or logging.getLogger().getEffectiveLevel()
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.block_size = config.block_size
        self.vocab_size = 0
        self.eos_token_ids: list[int] = []
        self.ready = False
        self.dead: str | None = None  # why the engine is gone, once it is
        self.dead_event = asyncio.Event()
        self.request_observers: list[Callable[[RequestMetrics], None]] = []
        self._streams: dict[str, _Stream] = {}
        self._child_parent: dict[str, str] = {}
        self._subscribers: set[KVEventSubscription] = set()
        self._stats: dict = {}
        self._stats_event = asyncio.Event()
        self._last_heard = 0.0
        self._stopping = False
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.Task | None = None
        self._tmpdir = ipc_dir.make_socket_dir()
        self._sync_ctx = zmq.Context()
        self._async_ctx = zmq.asyncio.Context()
        self._inbox = self._sync_ctx.socket(zmq.PUSH)  # to the core; sends never block
        self._inbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox = self._async_ctx.socket(zmq.PULL)  # from the core
        self._outbox.setsockopt(zmq.RCVHWM, 0)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the core process and load the tokenizer meanwhile; returns once the model is
        loaded. Raises `EngineStartError` if it cannot be."""
        from fleetserve.engine.output_processor import OutputProcessor
        from fleetserve.models import load_tokenizer

        input_addr = f"ipc://{self._tmpdir}/input"
        output_addr = f"ipc://{self._tmpdir}/output"
        self._inbox.bind(input_addr)
        self._outbox.bind(output_addr)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds threads
        self._proc = ctx.Process(
            target=core_proc.run_engine_core,
            args=(self.config, input_addr, output_addr, self.log_level, self._tmpdir),
            name="fleetserve-engine-core",
            daemon=True,
        )
        self._proc.start()
        logger.info("engine core process %d started; loading %s", self._proc.pid, self.config.model)
        tokenizer = asyncio.create_task(
            asyncio.to_thread(load_tokenizer, self.config.tokenizer or self.config.model)
        )
        try:
            info = await self._wait_ready()
            self.tokenizer = await tokenizer
        except BaseException:
            tokenizer.cancel()
            raise
        self.max_model_len = info["max_model_len"]
        self.block_size = info["block_size"]
        self.vocab_size = info["vocab_size"]
        self.eos_token_ids = info["eos_token_ids"]
        self._processor = OutputProcessor(self.tokenizer)
        self._last_heard = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(), name="engine-core-reader")
        self.ready = True

    async def _wait_ready(self) -> dict:
        while True:
            if await self._outbox.poll(int(POLL_S * 1000)):
                msg = core_proc.unpack(await self._outbox.recv())
                if msg["kind"] == "ready":
                    return msg
                if msg["kind"] == "failed":
                    raise EngineStartError(msg["error"])
            elif not self._proc.is_alive():
                raise EngineStartError(
                    f"engine core process exited with code {self._proc.exitcode} while loading"
                )

    async def shutdown(self) -> None:
        """Stop the core process (politely, then by force) and release every resource."""
        self._stopping = True
        if self._reader is not None:
            self._reader.cancel()
        proc = self._proc
        if proc is not None and proc.is_alive():
            if self.ready:  # still loading: nothing to finish, and it may not listen yet
                self._send("shutdown", None)
                await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():  # the core ignores SIGTERM (see core_proc): kill it
                logger.info("killing the engine core process")
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        self._fail_all(EngineDeadError("the engine is shutting down"))
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        self._sync_ctx.term()
        self._async_ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ---- requests ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come (each with the deltas since the previous one),
        the last with `finished` set. A text prompt is tokenized unless `prompt_token_ids`
        are given. Closing the iterator early aborts the request in the core.

        Raises `EngineDeadError` if the core is gone, `RequestFailedError` if the core ended
        this request with an error, `ValueError` for a request id already in flight."""
        self._check_alive()
        if isinstance(prompt, str):
            text = prompt
            token_ids = prompt_token_ids or self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        stream = _Stream(time.monotonic(), len(token_ids))
        children = self._processor.add_request(
            request_id, text, token_ids, sampling_params, priority, time.time()
        )
        # Encode before anything else is registered, and unregister on every way out from
        # here on (the finally below): a request that cannot be sent must not stay counted.
        try:
            messages = [core_proc.pack(["add", core_proc.request_to_dict(r)]) for r in children]
        except Exception as exc:
            self._processor.abort(request_id)
            raise ValueError(f"request {request_id} cannot be sent to the engine: {exc}") from None
        self._streams[request_id] = stream
        finished = False
        try:
            for req, message in zip(children, messages, strict=True):
                stream.child_ids.append(req.request_id)
                self._child_parent[req.request_id] = request_id
                self._send_raw(message, "add")
            while not finished:
                out = await stream.get()
                finished = out.finished
                if out.error:  # its other choices (n > 1), if any, are aborted below
                    raise RequestFailedError(out.error)
                yield out
        finally:
            # Synchronous on purpose: this also runs inside a cancelled task (a client gone).
            if not finished:
                self.abort(request_id)
            self._forget(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request: its KV blocks are freed in the core's next loop iteration."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        child_ids = self._processor.abort(request_id)
        if child_ids and not self.dead:
            self._send("abort", child_ids)
        stream.fail(RequestFailedError("aborted"))

    def _forget(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        for child in stream.child_ids if stream else ():
            self._child_parent.pop(child, None)

    # ---- observability -----------------------------------------------------------------------

    def check_health(self) -> bool:
        """True while the core is loaded, alive, and heard from within `health_timeout_s`."""
        return (
            self.ready
            and not self.dead
            and self._proc is not None
            and self._proc.is_alive()
            and time.monotonic() - self._last_heard < self.health_timeout_s
        )

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests accepted here that have not produced a token yet (queued or prefilling)."""
        return sum(1 for s in self._streams.values() if s.first_token_time is None)

    def stats(self) -> dict:
        """The core's latest stats (see `EngineCore.stats`); empty until the first tick."""
        return dict(self._stats)

    async def fresh_stats(self, timeout_s: float = 0.5) -> dict:
        """Ask the core for stats now; falls back to the latest ones after `timeout_s`."""
        if self.ready and not self.dead:
            self._stats_event.clear()
            self._send("stats", None)
            try:
                await asyncio.wait_for(self._stats_event.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.stats()

    def subscribe_kv_events(self) -> KVEventSubscription:
        sub = KVEventSubscription(self)
        if self.dead or self._stopping:
            sub.close()
        else:
            self._subscribers.add(sub)
        return sub

    def close_subscribers(self) -> None:
        """End every KV-event stream (a draining server must not wait on them)."""
        for sub in list(self._subscribers):
            sub.close()

    # ---- the reader --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                if await self._outbox.poll(int(POLL_S * 1000)):
                    # Drain what is there, so a slow event loop catches up in one pass.
                    while True:
                        try:
                            raw = await self._outbox.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._last_heard = time.monotonic()
                        self._on_message(core_proc.unpack(raw))
                elif self._stopping:
                    continue
                elif not self._proc.is_alive():
                    self._die(f"engine core process died (exit code {self._proc.exitcode})")
                    return
                elif (silent := time.monotonic() - self._last_heard) > self.health_timeout_s:
                    # Alive but silent (hung, or stopped): as good as dead to its requests.
                    self._die(
                        f"engine core process {self._proc.pid} silent for {silent:.1f} s, "
                        f"more than the health timeout of {self.health_timeout_s:g} s"
                    )
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here would hang every request: fail loudly instead
            logger.exception("engine output reader crashed")
            self._die(f"engine output reader crashed: {exc}")

    def _on_message(self, msg: dict) -> None:
        if msg.get("kind") != "tick":
            logger.warning("unexpected message from the engine core: %r", msg.get("kind"))
            return
        now = time.monotonic()
        for child, seconds in msg["queue_times"].items():
            stream = self._streams.get(self._child_parent.get(child, ""))
            if stream is not None and stream.queue_time is None:
                stream.queue_time = seconds
        if msg["outputs"]:
            outputs = [core_proc.output_from_dict(d) for d in msg["outputs"]]
            results, to_abort = self._processor.process(outputs)
            if to_abort:
                self._send("abort", to_abort)
            for out in results:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if stream.first_token_time is None and any(c.token_ids for c in out.outputs):
                    stream.first_token_time = now
                if out.finished:
                    self._observe(stream, out, now)
                stream.put(out)
        if msg["kv_events"]:
            for sub in list(self._subscribers):
                sub._put(msg["kv_events"])
        if msg["stats"] is not None:
            self._stats = msg["stats"]
            self._stats_event.set()

    def _observe(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        reasons = {c.finish_reason for c in out.outputs}
        if out.error or "abort" in reasons:
            return
        metrics = RequestMetrics(
            arrival_time=stream.arrival_time,
            first_token_time=stream.first_token_time,
            finish_time=now,
            queue_time=stream.queue_time,
            num_prompt_tokens=stream.num_prompt_tokens,
            num_generation_tokens=sum(len(c.token_ids) for c in out.outputs),
            finish_reason=out.outputs[0].finish_reason if out.outputs else None,
        )
        for observer in self.request_observers:
            try:
                observer(metrics)
            except Exception:
                logger.exception("request observer failed")

    # ---- helpers -----------------------------------------------------------------------------

    def _send(self, kind: str, payload: Any) -> None:
        self._send_raw(core_proc.pack([kind, payload]), kind)

    def _send_raw(self, message: bytes, kind: str) -> None:
        try:
            self._inbox.send(message, zmq.NOBLOCK)
        except zmq.ZMQError:  # no core connected (starting, gone) or shut down: nobody to tell
            logger.debug("engine core not connected; dropped %r", kind)

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)
        if not self.ready or self._stopping:
            raise EngineDeadError("the engine is not running")

    def _die(self, reason: str) -> None:
        if self.dead:
            return
        logger.error("%s; failing %d in-flight requests", reason, len(self._streams))
        self.dead = reason
        self.ready = False
        self._fail_all(EngineDeadError(reason))
        self.dead_event.set()

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.fail(error)
        self.close_subscribers()
