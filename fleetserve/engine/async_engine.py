"""`AsyncEngine`: the LLM front end of an engine core running in its own process.

Tokenization, detokenization, stop strings and n > 1 fan-out happen here (the
`OutputProcessor`); the core process, reached through a `CoreClient`, only sees token ids.
The client's reader hands each tick's outputs to `_on_outputs`, which hands each request's
output to the coroutine streaming it. If the core process dies, every in-flight `generate`
raises `EngineDeadError`, `check_health()` turns false and `dead` is set, so that the
server can exit and a supervisor restart the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fleetserve.engine import messages
from fleetserve.engine.config import EngineConfig
from fleetserve.engine.core_client import (
    HEALTH_TIMEOUT_S,
    CoreClient,
    EngineDeadError,
    EngineStartError,
    KVEventSubscription,
)
from fleetserve.engine.messages import AbortRequests
from fleetserve.engine.outputs import EngineCoreOutput, RequestOutput
from fleetserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "EngineDeadError",
    "EngineStartError",
    "KVEventSubscription",
    "RequestFailedError",
    "RequestMetrics",
]


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


class AsyncEngine:
    """An LLM behind an engine core process: text in, `RequestOutput`s out, as the server's
    routes want them. Owns the tokenizer and the `OutputProcessor`; `core` owns the process."""

    def __init__(
        self,
        config: EngineConfig,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        log_level: int | None = None,
    ) -> None:
        self.config = config
        self.core = CoreClient(
            config, self._on_outputs, self._fail_all, health_timeout_s, log_level
        )
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.block_size = config.block_size
        self.vocab_size = 0
        self.eos_token_ids: list[int] = []
        self.ready = False
        self.request_observers: list[Callable[[RequestMetrics], None]] = []
        self._streams: dict[str, _Stream] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the core process and load the tokenizer meanwhile; returns once the model is
        loaded. Raises `EngineStartError` if it cannot be."""
        from fleetserve.engine.output_processor import OutputProcessor
        from fleetserve.models import load_tokenizer

        self.core.spawn()
        tokenizer = asyncio.create_task(
            asyncio.to_thread(load_tokenizer, self.config.tokenizer or self.config.model)
        )
        try:
            info = await self.core.wait_ready()
            self.tokenizer = await tokenizer
        except BaseException:
            tokenizer.cancel()
            raise
        self.max_model_len = info.max_model_len
        self.block_size = info.block_size
        self.vocab_size = info.vocab_size
        self.eos_token_ids = info.eos_token_ids
        self._processor = OutputProcessor(self.tokenizer)
        self.ready = True

    async def shutdown(self) -> None:
        """Stop the core process (politely, then by force) and release every resource."""
        await self.core.shutdown()
        self._fail_all(EngineDeadError("the engine is shutting down"))

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
            encoded = [messages.encode(r) for r in children]
        except Exception as exc:
            self._processor.abort(request_id)
            raise ValueError(f"request {request_id} cannot be sent to the engine: {exc}") from None
        self._streams[request_id] = stream
        finished = False
        try:
            for raw in encoded:
                self.core.send_encoded(raw, "add")
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
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request: its KV blocks are freed in the core's next loop iteration."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        child_ids = self._processor.abort(request_id)
        if child_ids and not self.dead:
            self.core.send(AbortRequests(child_ids))
        stream.fail(RequestFailedError("aborted"))

    # ---- observability -----------------------------------------------------------------------

    @property
    def dead(self) -> str | None:
        """Why the engine is gone, once it is."""
        return self.core.dead

    @property
    def dead_event(self) -> asyncio.Event:
        return self.core.dead_event

    def check_health(self) -> bool:
        """True while the core is loaded, alive, and heard from within the health timeout."""
        return self.ready and self.core.check_health()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def stats(self) -> dict:
        """The core's latest stats (see `EngineCore.stats`); empty until the first tick."""
        return self.core.stats()

    async def fresh_stats(self, timeout_s: float = 0.5) -> dict:
        """Ask the core for stats now; falls back to the latest ones after `timeout_s`."""
        if not self.ready:
            return self.stats()
        return await self.core.fresh_stats(timeout_s)

    def subscribe_kv_events(self) -> KVEventSubscription:
        return self.core.subscribe_kv_events()

    def close_subscribers(self) -> None:
        """End every KV-event stream (a draining server must not wait on them)."""
        self.core.close_subscribers()

    # ---- outputs from the core ---------------------------------------------------------------

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        now = time.monotonic()
        results, to_abort = self._processor.process(outputs)
        if to_abort:
            self.core.send(AbortRequests(to_abort))
        for out in results:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.first_token_time is None and any(c.token_ids for c in out.outputs):
                stream.first_token_time = now
            if out.finished:
                self._observe(stream, out, now)
            stream.put(out)

    def _observe(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        reasons = {c.finish_reason for c in out.outputs}
        if out.error or "abort" in reasons:
            return
        metrics = RequestMetrics(
            arrival_time=stream.arrival_time,
            first_token_time=stream.first_token_time,
            finish_time=now,
            queue_time=out.queue_time,
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

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)
        if not self.ready or self.core.stopping:
            raise EngineDeadError("the engine is not running")

    def _fail_all(self, error: EngineDeadError) -> None:
        """The core is gone (`error` says why): end every stream with it."""
        if self._streams and not self.core.stopping:
            logger.error("%s; failing %d in-flight requests", error, len(self._streams))
        self.ready = False
        for stream in self._streams.values():
            stream.fail(error)
        self.core.close_subscribers()
