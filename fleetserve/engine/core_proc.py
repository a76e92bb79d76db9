"""The engine core in its own process, talking to the API server over ZMQ.

    API server (CoreClient)  --PUSH input-->   core process (this file)
                             <--PUSH output--

The messages and their codec are in `messages`. An `Outputs` tick goes out after every
step that produced something, and at least every `HEARTBEAT_S` while idle: the front end
takes silence as a dead or hung core. The loop spins only while there is work; idle, it
blocks on the input socket.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import zmq

from fleetserve.engine import messages
from fleetserve.engine.config import EngineConfig
from fleetserve.engine.core import build_engine_core
from fleetserve.engine.kv_cache_manager import KVEvent
from fleetserve.engine.messages import (
    AbortRequests,
    Failed,
    Outputs,
    Ready,
    Shutdown,
    StatsRequest,
)
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # idle tick period
STATS_PERIOD_S = 0.1  # stats at most this often while busy


class Core(Protocol):
    """What `CoreLoop` drives (`EngineCore` is one)."""

    def add_request(self, req: EngineCoreRequest) -> list[EngineCoreOutput]:
        """Queue a request; the outputs of one it refuses at once."""
        ...

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]: ...

    def step(self) -> list[EngineCoreOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> dict: ...

    def take_kv_events(self) -> list[KVEvent]: ...


# ---- the process ------------------------------------------------------------------------------


def run_engine_core(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    log_level: int = logging.INFO,
    socket_dir: str | None = None,
    build_core: Callable[[EngineConfig], Core] = build_engine_core,
) -> None:
    """Entry point of the core process (started with the spawn method). `socket_dir` holds
    the ipc sockets: removed here if the API server dies first (it cannot remove it then).
    `build_core(config)` makes the core (a module-level function: spawn pickles it by name);
    besides the `Core` methods it has `max_model_len`, `block_size`, `vocab_size` and
    `eos_token_ids` for the `Ready` message."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s"
    )
    # Ctrl+C reaches the whole process group; the API server decides when the core stops.
    # Likewise SIGTERM sent to the whole group (as supervisors and `kill -- -PGID` do): the
    # server drains first and then shuts the core down; the core exits on its own if the
    # server process is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        try:
            core = build_core(config)
        except Exception as exc:  # a user error (bad path, bad config) or a bug: report it
            logger.exception("engine core failed to start")
            outbox.send(messages.encode(Failed(f"{type(exc).__name__}: {exc}")))
            raise SystemExit(1) from None
        ready = Ready(
            max_model_len=core.max_model_len,
            block_size=core.block_size,
            vocab_size=core.vocab_size,
            eos_token_ids=sorted(core.eos_token_ids),
            pid=os.getpid(),
        )
        outbox.send(messages.encode(ready))
        loop = CoreLoop(core, inbox, outbox)
        loop.run()
    finally:
        inbox.close(linger=0)
        outbox.close(linger=1000)
        ctx.term()
    if socket_dir and loop.orphaned:
        shutil.rmtree(socket_dir, ignore_errors=True)


class CoreLoop:
    """Receive, step, publish. One instance per core process."""

    def __init__(self, core: Core, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = os.getppid()
        self.running = True
        self.orphaned = False  # the API server died before telling us to stop
        self.live: set[str] = set()  # requests added and not finished
        self.outputs: list[EngineCoreOutput] = []  # to report in the next tick
        self.want_stats = True
        self.last_tick = 0.0
        self.last_stats = 0.0

    def run(self) -> None:
        while self.running:
            busy = self.core.has_unfinished()
            if self.inbox.poll(0 if busy else int(HEARTBEAT_S * 1000)):
                self._receive_all()
            if self.running and self.core.has_unfinished():
                self._step()
            self._publish(went_idle=busy and not self.core.has_unfinished())
            if os.getppid() != self.parent_pid:
                logger.error("API server process is gone; engine core exits")
                self.orphaned = True
                return

    # ---- input -------------------------------------------------------------------------------

    def _receive_all(self) -> None:
        while self.running:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(messages.decode(raw))
            except Exception:  # bad input must never kill the core
                logger.exception("dropping a malformed message from the front end")

    def _handle(self, msg: messages.FrontEndMessage) -> None:
        match msg:
            case EngineCoreRequest():
                self._add(msg)
            case AbortRequests(request_ids=ids):
                ids = [i for i in ids if i in self.live]
                self.live.difference_update(ids)
                self.core.abort_requests(ids)
            case StatsRequest():
                self.want_stats = True
            case Shutdown():
                self.running = False
            case _:
                raise ValueError(f"not a message to the engine core: {type(msg).__name__}")

    def _add(self, request: EngineCoreRequest) -> None:
        try:
            rejected = self.core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the core
            logger.warning("rejected request %s: %s", request.request_id, exc)
            error = str(exc)
            rejected = [
                EngineCoreOutput(request.request_id, [], finish_reason="error", error=error)
            ]
        if rejected:
            self.outputs.extend(rejected)
        else:
            self.live.add(request.request_id)

    # ---- the step ----------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception as exc:  # noqa: BLE001 - a bug in a step fails requests, not the core
            outputs = self._fail_all(exc)
        self.live.difference_update(o.request_id for o in outputs if o.finished)
        self.outputs.extend(outputs)

    def _fail_all(self, exc: Exception) -> list[EngineCoreOutput]:
        """A step raised past `EngineCore.step`'s own isolation (which ends only the requests
        that make the model run or the sampler fail): a bug in the bookkeeping, after which
        no request's state can be trusted. End every live request with an error instead of
        leaving it hanging; if even that fails, the core's state is beyond repair and the
        process exits (the API server notices and exits too, so that a supervisor restarts
        the replica)."""
        logger.error(
            "engine step failed; failing %d requests\n%s", len(self.live), traceback.format_exc()
        )
        ids = list(self.live)
        self.core.abort_requests(ids)
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        self.live.clear()
        return [EngineCoreOutput(rid, [], finish_reason="error", error=message) for rid in ids]

    # ---- output ------------------------------------------------------------------------------

    def _publish(self, went_idle: bool) -> None:
        now = time.monotonic()
        kv_events = self.core.take_kv_events()
        stats_due = self.want_stats or went_idle or now - self.last_stats >= STATS_PERIOD_S
        heartbeat_due = now - self.last_tick >= HEARTBEAT_S
        if not (self.outputs or kv_events or heartbeat_due or went_idle):
            return
        stats = self.core.stats() if stats_due else None
        self.outbox.send(messages.encode(Outputs(self.outputs, kv_events, stats)))
        self.outputs = []
        self.last_tick = now
        if stats is not None:
            self.last_stats, self.want_stats = now, False
