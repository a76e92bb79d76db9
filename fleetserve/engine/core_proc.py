"""The engine core in its own process, talking to the API server over ZMQ with msgpack.

    API server (AsyncEngine)  --PUSH input-->   core process (this file)
                              <--PUSH output--

Messages, front end -> core: a msgpack list ``[kind, payload]``

    ["add", {"request_id", "prompt_token_ids", "sampling_params": {field: value},
             "priority", "arrival_time"}]
    ["abort", [request_id, ...]]
    ["stats", None]       # answer with a tick carrying fresh stats now
    ["shutdown", None]

Core -> front end: a msgpack map with a "kind"

    {"kind": "ready", "max_model_len", "block_size", "vocab_size", "eos_token_ids", "pid"}
    {"kind": "failed", "error"}             # the model could not be loaded; the process exits
    {"kind": "tick", "outputs": [EngineCoreOutput as a map, ...], "kv_events": [KVEvent as a
     map, ...], "stats": {...} | None, "queue_times": {request_id: seconds}}

A tick goes out after every step that produced something, and at least every
`HEARTBEAT_S` while idle: the front end takes silence as a dead or hung core. The loop spins
only while there is work; idle, it blocks on the input socket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import time
import traceback
from typing import Any

import msgpack
import zmq

from fleetserve.engine.config import EngineConfig
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # idle tick period
STATS_PERIOD_S = 0.1  # stats at most this often while busy


# ---- the schema, shared by both ends --------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    # Logprobs are maps keyed by token id: allow int keys.
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def sampling_params_to_dict(params: SamplingParams) -> dict:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def request_to_dict(req: EngineCoreRequest) -> dict:
    return {
        "request_id": req.request_id,
        "prompt_token_ids": req.prompt_token_ids,
        "sampling_params": sampling_params_to_dict(req.sampling_params),
        "priority": req.priority,
        "arrival_time": req.arrival_time,
    }


def output_to_dict(out: EngineCoreOutput) -> dict:
    return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}


def output_from_dict(d: dict) -> EngineCoreOutput:
    return EngineCoreOutput(**d)


def kv_event_to_dict(event: Any) -> dict:
    return {
        "kind": event.kind,
        "block_hashes": list(event.block_hashes),
        "parent_hash": event.parent_hash,
        "token_ids": [list(t) for t in event.token_ids],
    }


# ---- the process ------------------------------------------------------------------------------


def run_engine_core(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    log_level: int = logging.INFO,
    socket_dir: str | None = None,
) -> None:
    """Entry point of the core process (started with the spawn method). `socket_dir` holds
    the ipc sockets: removed here if the API server dies first (it cannot remove it then)."""
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
            from fleetserve.engine.core import EngineCore

            core = EngineCore(config)
        except Exception as exc:  # a user error (bad path, bad config) or a bug: report it
            logger.exception("engine core failed to start")
            outbox.send(pack({"kind": "failed", "error": f"{type(exc).__name__}: {exc}"}))
            raise SystemExit(1) from None
        outbox.send(
            pack(
                {
                    "kind": "ready",
                    "max_model_len": core.max_model_len,
                    "block_size": core.block_size,
                    "vocab_size": core.model_config.vocab_size,
                    "eos_token_ids": sorted(core.eos_token_ids),
                    "pid": os.getpid(),
                }
            )
        )
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

    def __init__(self, core: Any, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = os.getppid()
        self.running = True
        self.orphaned = False  # the API server died before telling us to stop
        self.arrived: dict[str, float] = {}  # live request id -> arrival at the core
        self.scheduled: set[str] = set()  # live requests that have left the queue once
        self.queue_times: dict[str, float] = {}  # to report in the next tick
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
                kind, payload = unpack(raw)
                self._handle(kind, payload)
            except Exception:  # bad input must never kill the core
                logger.exception("dropping a malformed message from the front end")

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            self._add(payload)
        elif kind == "abort":
            ids = [i for i in payload if i in self.arrived]
            for i in ids:
                self._forget(i)
            self.core.abort_requests(ids)
        elif kind == "stats":
            self.want_stats = True
        elif kind == "shutdown":
            self.running = False
        else:
            raise ValueError(f"unknown message kind {kind!r}")

    def _add(self, payload: dict) -> None:
        request_id = str(payload["request_id"])
        try:
            request = EngineCoreRequest(
                request_id=request_id,
                prompt_token_ids=[int(t) for t in payload["prompt_token_ids"]],
                sampling_params=SamplingParams(**payload["sampling_params"]),
                priority=int(payload.get("priority", 0)),
                arrival_time=float(payload.get("arrival_time", 0.0)),
            )
            rejected = self.core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the core
            logger.warning("rejected request %s: %s", request_id, exc)
            rejected = [EngineCoreOutput(request_id, [], finish_reason="error", error=str(exc))]
        if rejected:
            self.outputs.extend(rejected)
        else:
            self.arrived[request_id] = time.monotonic()

    def _forget(self, request_id: str) -> None:
        self.arrived.pop(request_id, None)
        self.scheduled.discard(request_id)

    # ---- the step ----------------------------------------------------------------------------

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self.core.step()
        except Exception as exc:  # noqa: BLE001 - a bug in a step fails requests, not the core
            outputs = self._fail_all(exc)
        finished = {o.request_id for o in outputs if o.finished}
        requests = self.core.scheduler.requests
        for rid, arrival in self.arrived.items():
            # First time out of the waiting queue: `num_cached_tokens` is set on first
            # schedule; a request that finished within its first step is gone from `requests`.
            if rid not in self.scheduled and (
                rid in finished or (rid in requests and requests[rid].num_cached_tokens >= 0)
            ):
                self.queue_times[rid] = start - arrival
                self.scheduled.add(rid)
        for rid in finished:
            self._forget(rid)
        self.outputs.extend(outputs)

    def _fail_all(self, exc: Exception) -> list[EngineCoreOutput]:
        """A step raised past `EngineCore.step`'s own isolation (which ends only the requests
        that make the model run or the sampler fail): a bug in the bookkeeping, after which
        no request's state can be trusted. End every live request with an error instead of
        leaving it hanging; if even that fails, the core's state is beyond repair and the
        process exits (the API server notices and exits too, so that a supervisor restarts
        the replica)."""
        logger.error(
            "engine step failed; failing %d requests\n%s", len(self.arrived), traceback.format_exc()
        )
        ids = list(self.arrived)
        self.core.abort_requests(ids)
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        for rid in ids:
            self._forget(rid)
        return [EngineCoreOutput(rid, [], finish_reason="error", error=message) for rid in ids]

    # ---- output ------------------------------------------------------------------------------

    def _publish(self, went_idle: bool) -> None:
        now = time.monotonic()
        kv_events = self.core.take_kv_events()
        stats_due = self.want_stats or went_idle or now - self.last_stats >= STATS_PERIOD_S
        heartbeat_due = now - self.last_tick >= HEARTBEAT_S
        if not (self.outputs or kv_events or self.queue_times or heartbeat_due or went_idle):
            return
        stats = self.core.stats() if stats_due else None
        message = {
            "kind": "tick",
            "outputs": [output_to_dict(o) for o in self.outputs],
            "kv_events": [kv_event_to_dict(e) for e in kv_events],
            "stats": stats,
            "queue_times": self.queue_times,
        }
        self.outbox.send(pack(message))
        self.outputs, self.queue_times = [], {}
        self.last_tick = now
        if stats is not None:
            self.last_stats, self.want_stats = now, False
