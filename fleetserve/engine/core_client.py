"""`CoreClient`: the API server's link to an engine core in its own process.

It starts the process, sends it `messages`, reads its ticks on one asyncio task, and
watches that it lives: a core that exits, or stays silent longer than `health_timeout_s`,
is dead (`dead` says why, `dead_event` is set, `on_dead` runs). It knows nothing of
tokens or text: each tick's outputs go to `on_outputs`, its stats and KV events are kept
and fanned out here. The LLM front end (`AsyncEngine`) is one user; another kind of engine
can sit on the same client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import shutil
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from fleetserve.engine import core_proc, ipc_dir, messages
from fleetserve.engine.config import EngineConfig
from fleetserve.engine.core import build_engine_core
from fleetserve.engine.messages import Failed, Outputs, Ready, Shutdown, StatsRequest
from fleetserve.engine.outputs import EngineCoreOutput

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 20.0  # a core silent for longer is reported unhealthy (a step can be slow)
POLL_S = 0.25  # how often the reader checks that the core process is alive
KV_EVENT_QUEUE = 4096  # batches a KV-event subscriber may fall behind before it is dropped


class EngineDeadError(RuntimeError):
    """The engine core process is gone (or was never started); nothing can be generated."""


class EngineStartError(RuntimeError):
    """The engine core could not load the model."""


class KVEventSubscription:
    """Batches of KV events (dicts of `KVEvent`'s fields) as they leave the core. Ends when
    the engine stops, or when this subscriber falls `KV_EVENT_QUEUE` batches behind (it has
    then missed events: reconnect and rebuild from empty)."""

    def __init__(self, client: CoreClient) -> None:
        self._client = client
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
        self._client._subscribers.discard(self)
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


class CoreClient:
    """`on_outputs(outputs)` gets each tick's core outputs (never an empty list);
    `on_dead(error)` runs once when the core is found dead, with the `EngineDeadError` to
    fail requests with. The core process runs `build_core(config)` (see
    `core_proc.run_engine_core`)."""

    def __init__(
        self,
        config: EngineConfig,
        on_outputs: Callable[[list[EngineCoreOutput]], None],
        on_dead: Callable[[EngineDeadError], None],
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        log_level: int | None = None,
        build_core: Callable[[EngineConfig], core_proc.Core] = build_engine_core,
    ) -> None:
        self.config = config
        self.build_core = build_core
        self.on_outputs = on_outputs
        self.on_dead = on_dead
        self.health_timeout_s = health_timeout_s
        self.log_level = log_level or logging.getLogger().getEffectiveLevel()
        self.info: Ready | None = None  # the core's `Ready`, once it is loaded
        self.dead: str | None = None  # why the core is gone, once it is
        self.dead_event = asyncio.Event()
        self.stopping = False
        self._subscribers: set[KVEventSubscription] = set()
        self._stats: dict = {}
        self._stats_event = asyncio.Event()
        self._last_heard = 0.0
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

    def spawn(self) -> None:
        """Start the core process; `wait_ready` then waits for its model to load."""
        input_addr = f"ipc://{self._tmpdir}/input"
        output_addr = f"ipc://{self._tmpdir}/output"
        self._inbox.bind(input_addr)
        self._outbox.bind(output_addr)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds threads
        self._proc = ctx.Process(
            target=core_proc.run_engine_core,
            args=(
                self.config,
                input_addr,
                output_addr,
                self.log_level,
                self._tmpdir,
                self.build_core,
            ),
            name="fleetserve-engine-core",
            daemon=True,
        )
        self._proc.start()
        logger.info("engine core process %d started; loading %s", self._proc.pid, self.config.model)

    async def wait_ready(self) -> Ready:
        """Wait for the model to load, then start reading the core's ticks. Raises
        `EngineStartError` if it cannot be loaded."""
        while True:
            if await self._outbox.poll(int(POLL_S * 1000)):
                msg = messages.decode(await self._outbox.recv())
                if isinstance(msg, Ready):
                    break
                if isinstance(msg, Failed):
                    raise EngineStartError(msg.error)
            elif not self._proc.is_alive():
                raise EngineStartError(
                    f"engine core process exited with code {self._proc.exitcode} while loading"
                )
        self.info = msg
        self._last_heard = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(), name="engine-core-reader")
        return msg

    async def shutdown(self) -> None:
        """Stop the core process (politely, then by force) and release every resource."""
        self.stopping = True
        if self._reader is not None:
            self._reader.cancel()
        proc = self._proc
        if proc is not None and proc.is_alive():
            if self.info is not None:  # loaded: ask it to finish (while loading it may not listen)
                self.send(Shutdown())
                await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():  # the core ignores SIGTERM (see core_proc): kill it
                logger.info("killing the engine core process")
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        self.close_subscribers()
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        self._sync_ctx.term()
        self._async_ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ---- sending -----------------------------------------------------------------------------

    def send(self, message: messages.FrontEndMessage) -> None:
        self.send_encoded(messages.encode(message), type(message).__name__)

    def send_encoded(self, raw: bytes, what: str = "message") -> None:
        """Send bytes from `messages.encode`; never blocks. Dropped when no core listens."""
        try:
            self._inbox.send(raw, zmq.NOBLOCK)
        except zmq.ZMQError:  # no core connected (starting, gone) or shut down: nobody to tell
            logger.debug("engine core not connected; dropped %s", what)

    # ---- observability -----------------------------------------------------------------------

    def check_health(self) -> bool:
        """True while the core is loaded, alive, and heard from within `health_timeout_s`."""
        return (
            self.info is not None
            and not self.dead
            and self._proc is not None
            and self._proc.is_alive()
            and time.monotonic() - self._last_heard < self.health_timeout_s
        )

    def stats(self) -> dict:
        """The core's latest stats (see `EngineCore.stats`); empty until the first tick."""
        return dict(self._stats)

    async def fresh_stats(self, timeout_s: float = 0.5) -> dict:
        """Ask the core for stats now; falls back to the latest ones after `timeout_s`."""
        if self.info is not None and not self.dead:
            self._stats_event.clear()
            self.send(StatsRequest())
            try:
                await asyncio.wait_for(self._stats_event.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.stats()

    def subscribe_kv_events(self) -> KVEventSubscription:
        sub = KVEventSubscription(self)
        if self.dead or self.stopping:
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
                        self._on_message(messages.decode(raw))
                elif self.stopping:
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

    def _on_message(self, msg: messages.CoreMessage) -> None:
        if not isinstance(msg, Outputs):
            logger.warning("unexpected message from the engine core: %s", type(msg).__name__)
            return
        if msg.outputs:
            self.on_outputs(msg.outputs)
        if msg.kv_events:
            batch = [dataclasses.asdict(e) for e in msg.kv_events]
            for sub in list(self._subscribers):
                sub._put(batch)
        if msg.stats is not None:
            self._stats = msg.stats
            self._stats_event.set()

    def _die(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = reason
        self.on_dead(EngineDeadError(reason))
        self.close_subscribers()
        self.dead_event.set()
