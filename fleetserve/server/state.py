"""The replica's state, shared by its routes: settings, the engine, the phase of its life
(loading -> ready -> draining; or failed / dead), and the requests in flight."""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from fleetserve.engine.async_engine import AsyncEngine, EngineStartError
from fleetserve.engine.config import EngineConfig
from fleetserve.server.errors import APIError
from fleetserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# A replica whose engine died answers 503 this long before it exits, so that health probes
# see why it went away (in-flight requests have their errors by then).
DEAD_EXIT_DELAY_S = 1.0
RETRY_AFTER_S = 1  # Retry-After for 429: one step drains the queue little, a second often


@dataclass(frozen=True)
class ServerSettings:
    engine: EngineConfig
    served_model_name: str
    api_key: str | None = None
    max_queue_len: int = 1024  # requests waiting for their first token; more get 429
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    max_body_bytes: int = 4 * 2**20
    health_timeout: float = 20.0  # seconds of engine silence: /health 503, requests fail, exit 1

    def __post_init__(self) -> None:
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1, got {self.max_queue_len}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.health_timeout > 0:
            raise ValueError(f"health_timeout must be > 0, got {self.health_timeout}")


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"  # the model could not be loaded
    DEAD = "dead"  # the engine core process died


class ServerState:
    def __init__(
        self,
        settings: ServerSettings,
        on_ready: Callable[[], None] | None = None,
        request_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = AsyncEngine(settings.engine, health_timeout_s=settings.health_timeout)
        self.metrics = ServerMetrics(self.engine, settings.served_model_name)
        self.phase = Phase.LOADING
        self.created = int(time.time())
        self.in_flight = 0  # generation requests being answered (streams included)
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_ready = on_ready
        self._request_exit = request_exit or (lambda code: None)
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the engine in the background: the HTTP server answers 503 meanwhile."""
        self._spawn(self._run())

    async def _run(self) -> None:
        start = time.monotonic()
        try:
            await self.engine.start()
        except EngineStartError as exc:
            logger.error("could not start the engine: %s", exc)
            self.phase = Phase.FAILED
            self._request_exit(1)
            return
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
        logger.info("engine ready in %.1f s", time.monotonic() - start)
        if self._on_ready:
            self._on_ready()
        await self.engine.dead_event.wait()
        self.phase = Phase.DEAD
        logger.error("exiting in %.0f s: %s", DEAD_EXIT_DELAY_S, self.engine.dead)
        await asyncio.sleep(DEAD_EXIT_DELAY_S)
        self._request_exit(1)

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work with 503, let requests in flight finish (at most
        `drain_timeout` seconds), then exit 0."""
        if self.phase in (Phase.DRAINING, Phase.DEAD, Phase.FAILED):
            return
        logger.info(
            "draining: %d requests in flight, up to %.0f s",
            self.in_flight,
            self.settings.drain_timeout,
        )
        self.phase = Phase.DRAINING
        self._spawn(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
            logger.info("drained")
        except TimeoutError:
            logger.warning("drain timeout: %d requests still in flight", self.in_flight)
        self.engine.close_subscribers()
        self._request_exit(0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.engine.shutdown()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- per request -------------------------------------------------------------------------

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def check_ready(self) -> None:
        if self.phase is Phase.READY and self.engine.check_health():
            return
        reasons = {
            Phase.LOADING: ("the model is loading", "loading"),
            Phase.DRAINING: ("this replica is shutting down", "draining"),
            Phase.FAILED: ("the model failed to load", "engine_failed"),
            Phase.DEAD: ("the engine has stopped", "engine_dead"),
        }
        message, code = reasons.get(self.phase, ("the engine is not responding", "unhealthy"))
        headers = {"Retry-After": "5"} if self.phase is Phase.LOADING else None
        raise APIError(503, message, code=code, headers=headers)

    def check_model_loaded(self) -> None:
        """503 while the model loads or after it failed to: a client that polls /v1/models
        for readiness (as some benchmark tools do) must not see a model it cannot use yet."""
        if self.phase in (Phase.LOADING, Phase.FAILED):
            self.check_ready()

    def check_queue(self) -> None:
        if self.engine.num_waiting >= self.settings.max_queue_len:
            raise APIError(
                429,
                f"too many requests waiting ({self.settings.max_queue_len}); retry later",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def check_model(self, name: str | None) -> str:
        served = self.settings.served_model_name
        if name is not None and name != served:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server has `{served}`",
                param="model",
                code="model_not_found",
            )
        return served


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def require_api_key(request: Request) -> None:
    """FastAPI dependency: the bearer token must equal --api-key (constant-time compare)."""
    key = get_state(request).settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("latin-1"), key.encode()
    )
    if not ok:
        raise APIError(
            401,
            "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )
