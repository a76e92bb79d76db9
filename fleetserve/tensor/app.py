"""A tensor-model replica's FastAPI app: the same door as the LLM replica's (request ids,
body limit, OpenAI-style errors, API and operator keys, /health, /metrics, drain on
SIGTERM), with `/predict`, `/v1/embeddings` and KServe v2 behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from fleetserve.server import errors
from fleetserve.server.app import _add_docs
from fleetserve.server.errors import APIError, error_response
from fleetserve.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from fleetserve.server.state import require_operator_key
from fleetserve.tensor import api, v2_api
from fleetserve.tensor.inference import get_state
from fleetserve.tensor.state import HandlerFactory, TensorSettings, TensorState, load_handler

State = Annotated[TensorState, Depends(get_state)]


def build_app(
    settings: TensorSettings,
    on_ready: Callable[[], None] | None = None,
    request_exit: Callable[[int], None] | None = None,
    handler_factory: HandlerFactory = load_handler,
) -> FastAPI:
    """As `fleetserve.server.app.build_app`; `handler_factory(settings)` loads the model."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = TensorState(settings, on_ready, request_exit, handler_factory)
        app.state.server = state
        state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="fleetserve",
        summary="A tensor-model replica: /predict, /v1/embeddings and KServe v2, with dynamic "
        "batching.",
        version=v2_api.SERVER_VERSION,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    errors.install(app)
    app.include_router(api.router)
    app.include_router(v2_api.router)
    _add_ops(app)
    _add_docs(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_ops(app: FastAPI) -> None:
    @app.get("/health", responses={503: {"description": "loading, draining or stuck"}})
    async def health(state: State) -> Response:
        """200 while the workers run and no batch is stuck; 503 otherwise. `task` tells a
        gateway that this replica is not an LLM (its probe then generates nothing)."""
        try:
            state.check_ready()
        except APIError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok", "task": state.handler.task})

    @app.get("/metrics", dependencies=[Depends(require_operator_key)], tags=["operator"])
    async def metrics(state: State) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
