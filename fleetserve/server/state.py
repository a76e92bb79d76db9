"""The replica's state, shared by its routes: settings, the engine, the phase of its life
(loading -> ready -> draining; or failed / dead), and the requests in flight."""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from fleetserve.engine.async_engine import AsyncEngine, EngineStartError
from fleetserve.engine.config import EngineConfig
from fleetserve.http_limits import HttpLimits
from fleetserve.server.errors import APIError
from fleetserve.server.limits import max_token_chars
from fleetserve.server.metrics import ServerMetrics
from fleetserve.server.protocol import MAX_PROMPTS

logger = logging.getLogger(__name__)

# A replica whose engine died answers 503 this long before it exits, so that health probes
# see why it went away (in-flight requests have their errors by then).
DEAD_EXIT_DELAY_S = 1.0
RETRY_AFTER_S = 1  # Retry-After for 429: one step drains the queue little, a second often
# Threads for tokenizing, chat templates and detokenizing big outputs, off the event loop
# (HF fast tokenizers release the GIL; more threads than cores would only queue inside).
BLOCKING_WORKERS = 4

# Characters per token assumed when the vocabulary cannot be read: so many that the cheap
# length check never refuses a prompt that could fit (the body limit still bounds it).
UNKNOWN_TOKEN_CHARS = 2**20

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    engine: EngineConfig
    served_model_name: str
    api_key: str | None = None  # clients' key for /v1 (the operator key works there too)
    operator_key: str | None = None  # for /metrics, /docs, /openapi.json, /v1/kv_events
    # engine requests (prompts x n) waiting for their first token; a request that would make
    # more gets 429, one that alone is more gets 400
    max_queue_len: int = 1024
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    max_body_bytes: int = 4 * 2**20
    health_timeout: float = 20.0  # seconds of engine silence: /health 503, requests fail, exit 1
    # The body's `priority` reorders the engine's queue and its preemption victims: only a
    # trusted caller (a gateway that sets it from the API key's class) may send one.
    allow_client_priority: bool = False
    # Work one HTTP request may buy: a list prompt is one engine request per prompt, each
    # with n choices. A quarter of the default queue, so four such requests can wait at once.
    max_prompts_per_request: int = 256
    max_choices_per_request: int = 256  # prompts x n
    http: HttpLimits = field(default_factory=HttpLimits)

    def __post_init__(self) -> None:
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1, got {self.max_queue_len}")
        if not 1 <= self.max_prompts_per_request <= MAX_PROMPTS:
            raise ValueError(
                f"max_prompts_per_request must be in [1, {MAX_PROMPTS}], "
                f"got {self.max_prompts_per_request}"
            )
        if self.max_choices_per_request < 1:
            raise ValueError(
                f"max_choices_per_request must be >= 1, got {self.max_choices_per_request}"
            )
        if self.api_key is not None and self.api_key == self.operator_key:
            raise ValueError("operator_key must differ from api_key: clients would be operators")
        if not (self.drain_timeout >= 0 and math.isfinite(self.drain_timeout)):
            raise ValueError(f"drain_timeout must be a number >= 0, got {self.drain_timeout}")
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


EngineFactory = Callable[[ServerSettings], AsyncEngine]


def llm_engine(settings: ServerSettings) -> AsyncEngine:
    """The default engine of a replica: an LLM behind an engine core in its own process."""
    return AsyncEngine(settings.engine, health_timeout_s=settings.health_timeout)


class ServerState:
    """`engine_factory(settings)` makes the engine behind the routes (not started yet)."""

    def __init__(
        self,
        settings: ServerSettings,
        on_ready: Callable[[], None] | None = None,
        request_exit: Callable[[int], None] | None = None,
        engine_factory: EngineFactory = llm_engine,
    ) -> None:
        self.settings = settings
        self.engine = engine_factory(settings)
        self.metrics = ServerMetrics(self.engine, settings.served_model_name)
        self.phase = Phase.LOADING
        self.created = int(time.time())
        self.in_flight = 0  # generation requests being answered (streams included)
        # Engine requests (one per prompt and choice) admitted and without a first token yet:
        # reserved when a request is admitted, so concurrent admissions cannot overshoot.
        self.num_waiting = 0
        self.max_token_chars = 1  # the vocabulary's longest token, known once loaded
        self._blocking = ThreadPoolExecutor(BLOCKING_WORKERS, thread_name_prefix="fleetserve-cpu")
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
        # The worker threads share one HF tokenizer. Its first encode may write (switch off a
        # truncation or padding its file enables; a concurrent call then fails "Already
        # borrowed"); later ones only read. So the first runs here, alone.
        await self.run_blocking(self.engine.tokenizer.encode, "warm up")
        try:
            self.max_token_chars = await self.run_blocking(max_token_chars, self.engine.tokenizer)
        except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary list
            logger.exception("cannot measure the vocabulary; long texts are tokenized to check")
            self.max_token_chars = UNKNOWN_TOKEN_CHARS
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
        self._blocking.shutdown(wait=False, cancel_futures=True)

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

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the server's worker threads: CPU work that would otherwise stall
        every stream and /health (tokenizing, chat templates, detokenizing big outputs)."""
        return await asyncio.get_running_loop().run_in_executor(self._blocking, fn, *args)

    def check_queue(self, cost: int = 1) -> None:
        """`cost` engine requests may join the waiting ones: 400 if they never could, 429 if
        they cannot now."""
        limit = self.settings.max_queue_len
        if cost > limit:
            raise APIError(
                400,
                f"this request makes {cost} engine requests (prompts x n), more than the "
                f"{limit} this server queues (--max-queue-len); split it",
                param="n",
                code="request_too_large",
            )
        if self.num_waiting + cost > limit:
            raise APIError(
                429,
                f"too many requests waiting ({self.num_waiting} of {limit}); retry later",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def reserve_queue(self, cost: int) -> None:
        """Admit `cost` engine requests (`check_queue` first); `release_queue` each as it
        starts or ends."""
        self.check_queue(cost)
        self.num_waiting += cost

    def release_queue(self, count: int) -> None:
        self.num_waiting -= count
        assert self.num_waiting >= 0, "released more queue places than were reserved"

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


def _bearer(request: Request) -> bytes | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" else None


def _matches(token: bytes | None, key: str | None) -> bool:
    # Constant time, and both sides compared even when the first matches.
    return token is not None and key is not None and hmac.compare_digest(token, key.encode())


async def require_api_key(request: Request) -> None:
    """FastAPI dependency of the client routes (/v1): the bearer token must be --api-key or
    --operator-key. Open only when neither is set. A coroutine because FastAPI runs a plain
    function dependency on its thread pool: a thread hand-off on every request."""
    settings = get_state(request).settings
    if not settings.api_key and not settings.operator_key:
        return
    token = _bearer(request)
    if not (_matches(token, settings.api_key) | _matches(token, settings.operator_key)):
        raise APIError(
            401,
            "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )


async def require_operator_key(request: Request) -> None:
    """FastAPI dependency of the operator routes (/metrics, /docs, /openapi.json,
    /v1/kv_events): once any key is configured they need --operator-key; a client key is
    403. A server with no key at all is an open development server."""
    settings = get_state(request).settings
    if not settings.api_key and not settings.operator_key:
        return
    token = _bearer(request)
    if _matches(token, settings.operator_key):
        return
    if _matches(token, settings.api_key):
        how = (
            "send the server's --operator-key"
            if settings.operator_key
            else "this server has no --operator-key; restart it with one"
        )
        raise APIError(
            403,
            f"this route needs the operator scope, and a client API key is not enough: {how}",
            code="operator_scope_required",
        )
    raise APIError(
        401,
        "Missing or incorrect operator key: send --operator-key as 'Authorization: Bearer KEY'",
        code="invalid_api_key",
    )
