"""A tensor-model replica's settings and state: the phase of its life (loading -> ready ->
draining, or failed), the handler and its workers, the requests in flight. The routes'
shared `require_api_key` / `require_operator_key` read `settings.api_key`/`operator_key`."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.http_limits import HttpLimits
from fleetserve.server.errors import APIError
from fleetserve.server.state import Phase
from fleetserve.tensor.batcher import BatchConfig
from fleetserve.tensor.handlers import Handler
from fleetserve.tensor.loading import LoadOptions
from fleetserve.tensor.metrics import TensorMetrics
from fleetserve.tensor.workers import Workers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSettings:
    model: str
    served_model_name: str
    load: LoadOptions = field(default_factory=LoadOptions)
    handler: str | None = None  # a module with preprocess/postprocess
    batch: BatchConfig = field(default_factory=BatchConfig)
    instances: int = 1
    api_key: str | None = None
    operator_key: str | None = None
    allow_client_priority: bool = False
    drain_timeout: float = 30.0
    max_body_bytes: int = 4 * 2**20
    health_timeout: float = 20.0  # a batch running longer makes /health 503
    http: HttpLimits = field(default_factory=HttpLimits)

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.api_key is not None and self.api_key == self.operator_key:
            raise ValueError("operator_key must differ from api_key: clients would be operators")
        if not (self.drain_timeout >= 0 and math.isfinite(self.drain_timeout)):
            raise ValueError(f"drain_timeout must be a number >= 0, got {self.drain_timeout}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.health_timeout > 0:
            raise ValueError(f"health_timeout must be > 0, got {self.health_timeout}")


# `(settings) -> Handler`: loads the model and wraps it; tests pass their own.
HandlerFactory = Callable[[TensorSettings], Handler]


def load_handler(settings: TensorSettings) -> Handler:
    from fleetserve.tensor.handlers import build_handler
    from fleetserve.tensor.loading import load_model

    model = load_model(settings.model, settings.load)
    return build_handler(model, settings.model, settings.load.task, settings.handler)


class TensorState:
    def __init__(
        self,
        settings: TensorSettings,
        on_ready: Callable[[], None] | None = None,
        request_exit: Callable[[int], None] | None = None,
        handler_factory: HandlerFactory = load_handler,
    ) -> None:
        self.settings = settings
        self.phase = Phase.LOADING
        self.created = int(time.time())
        self.handler: Handler | None = None
        self.workers: Workers | None = None
        self.metrics = TensorMetrics(settings.served_model_name, self._load)
        self.load_error = ""
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_ready = on_ready
        self._request_exit = request_exit or (lambda code: None)
        self._handler_factory = handler_factory
        self._tasks: set[asyncio.Task] = set()

    def _load(self) -> tuple[int, int]:
        return self.workers.load() if self.workers else (0, 0)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._run())

    async def _run(self) -> None:
        start = time.monotonic()
        try:
            handler = await asyncio.to_thread(self._handler_factory, self.settings)
        except Exception as exc:  # noqa: BLE001 - any load failure ends this replica
            logger.error("could not load %s: %s", self.settings.model, exc)
            self.load_error = str(exc)
            self.phase = Phase.FAILED
            self._request_exit(1)
            return
        self.handler = handler
        self.workers = Workers(
            handler, self.settings.batch, self.metrics, instances=self.settings.instances
        )
        self.workers.start()
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
        logger.info("%s model ready in %.1f s", handler.task, time.monotonic() - start)
        if self._on_ready:
            self._on_ready()

    def begin_drain(self) -> None:
        """SIGTERM: new requests get 503, those in flight finish (at most `drain_timeout`)."""
        if self.phase in (Phase.DRAINING, Phase.FAILED):
            return
        logger.info("draining: %d requests in flight", self.in_flight)
        self.phase = Phase.DRAINING
        self._spawn(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
            logger.info("drained")
        except TimeoutError:
            logger.warning("drain timeout: %d requests still in flight", self.in_flight)
        self._request_exit(0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.workers is not None:
            await asyncio.to_thread(self.workers.stop)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- per request ------------------------------------------------------------------------

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def healthy(self) -> bool:
        return (
            self.workers is not None
            and self.workers.alive()
            and self.workers.oldest_batch_age() < self.settings.health_timeout
        )

    def check_ready(self) -> None:
        if self.phase is Phase.READY and self.healthy():
            return
        reasons = {
            Phase.LOADING: ("the model is loading", "loading"),
            Phase.DRAINING: ("this replica is shutting down", "draining"),
            Phase.FAILED: (f"the model failed to load: {self.load_error}", "engine_failed"),
        }
        message, code = reasons.get(self.phase, ("the model is not responding", "unhealthy"))
        headers = {"Retry-After": "5"} if self.phase is Phase.LOADING else None
        raise APIError(503, message, code=code, headers=headers)

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
