"""The gateway's HTTP API: the OpenAI endpoints it forwards, a tensor model's `/predict`
and KServe v2 routes, plus health, metrics and a small admin API over the replica table.

Operator routes: `/admin/*` is off unless an admin key is configured (see `api_keys`), and
needs it. `/metrics`, `/docs`, `/redoc` and `/openapi.json` are open while no key at all is
configured, and need the admin key once any is."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.proxy import (
    HttpError,
    authenticate,
    authenticate_operator,
    authenticate_peer,
    handle_generate,
    handle_passthrough,
    read_json,
)
from fleetserve.gateway.replica import Replica, ReplicaKind


def create_app(gw: Gateway) -> FastAPI:
    """The app starts and stops `gw` with its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(
        title="fleetserve gateway",
        lifespan=lifespan,
        docs_url=None,  # served below, behind the operator key
        redoc_url=None,
        openapi_url=None,
        # No 307 to the slash-less path: its Location would echo the client's Host header.
        redirect_slashes=False,
    )
    app.state.gateway = gw
    # Raised by the routes below (authentication, bad admin requests); the generate routes
    # render their own, with the request id.
    app.add_exception_handler(HttpError, lambda _, err: err.response())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Unknown routes and wrong methods in OpenAI's error shape, as every other answer."""
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return HttpError(exc.status_code, str(exc.detail), err_type, exc.headers).response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle_generate(gw, request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle_generate(gw, request, "/v1/chat/completions", chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await handle_generate(gw, request, "/v1/embeddings", chat=False)

    # A tensor model's routes (`fleetserve serve MODEL` for a non-LLM model), forwarded as
    # they come. The replica path is rebuilt from checked parts: a model named ".." must not
    # reach another replica route with the fleet's internal key.
    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await handle_passthrough(gw, request, "/predict", "/predict")

    @app.get("/v2")
    async def v2_server(request: Request) -> Response:
        return await handle_passthrough(gw, request, "/v2", "/v2", method="GET")

    @app.get("/v2/health/live")
    async def v2_live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def v2_ready() -> Response:
        ready = gw.any_accepting() or gw.dispatcher.cold_start_s is not None
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def v2_model(request: Request, model: str, version: str | None = None) -> Response:
        path = _v2_path(model, version, "")
        return await handle_passthrough(gw, request, "/v2/models/{model}", path, method="GET")

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def v2_model_ready(request: Request, model: str, version: str | None = None) -> Response:
        path = _v2_path(model, version, "ready")
        return await handle_passthrough(gw, request, "/v2/models/{model}/ready", path, method="GET")

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer(request: Request, model: str, version: str | None = None) -> Response:
        path = _v2_path(model, version, "infer")
        return await handle_passthrough(gw, request, "/v2/models/{model}/infer", path)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authenticate(gw, request)
        ids = sorted({m for r in gw.replicas.values() for m in r.model_ids})
        data = [{"id": m, "object": "model", "owned_by": "fleetserve"} for m in ids]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> Response:
        """200 while requests can be served: some replica accepts work, or the fleet starts
        one on demand (scaled to zero, requests are held: a load balancer must keep sending
        them here, not take the gateway out)."""
        accepting = sum(1 for v in gw.views(gw.clock()) if v.accepting)
        on_demand = gw.dispatcher.cold_start_s is not None
        if accepting:
            status = "ok"
        elif on_demand and not gw.replicas:
            status = "scaled to zero"
        elif on_demand and any(r.failed is None for r in gw.replicas.values()):
            status = "replicas starting"
        elif gw.can_fail_over(None):  # its users are served by another region
            status = "failing over to peer regions"
        else:  # none serves and none will: fixed URLs all down, or every replica failed
            status = "no replica ready"
        answer: dict = {"status": status, "replicas_accepting": accepting}
        if gw.regions is not None:
            answer["regions"] = gw.regions.describe(gw.clock())
        return JSONResponse(answer, 503 if status == "no replica ready" else 200)

    @app.get("/region/state")
    async def region_state(request: Request) -> Response:
        """This region for its peers (`peers.RegionReport`): behind the peer key, off
        without regions."""
        if gw.regions is None or not gw.regions.config.peer_key:
            raise HttpError(
                403, "this gateway has no peer key: start it with --region and a peer key "
                "($FLEETSERVE_PEER_KEY)", "permission_error",
            )  # fmt: skip
        if not authenticate_peer(gw, request):
            raise HttpError(
                401, "the peer key is required (Authorization: Bearer KEY)", "authentication_error"
            )
        return JSONResponse(gw.regions.report(gw.clock()).to_json())

    @app.get("/health/live")
    async def live() -> Response:
        """Liveness: the gateway answers (whether or not any replica does)."""
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authenticate_operator(gw, request, admin_api=False)
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        authenticate_operator(gw, request, admin_api=False)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        authenticate_operator(gw, request, admin_api=False)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        authenticate_operator(gw, request, admin_api=False)
        return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/admin/replicas")
    async def list_replicas(request: Request) -> Response:
        authenticate_operator(gw, request, admin_api=True)
        return JSONResponse([_describe(gw, gw.replicas[k]) for k in sorted(gw.replicas)])

    @app.post("/admin/replicas")
    async def add_replica(request: Request) -> Response:
        """Body: {"url": ..., "kind": "fleetserve" | "openai", "api_key": optional}. The
        replica gets no user traffic until an active probe passes, and never the fleet's
        internal key: only `api_key`, if given."""
        try:
            authenticate_operator(gw, request, admin_api=True)
            body = await read_json(request, ADMIN_BODY_LIMIT)
            if not isinstance(body, dict) or not isinstance(body.get("url"), str):
                raise ValueError("'url' must be a string")
            api_key = body.get("api_key")
            if api_key is not None and not isinstance(api_key, str):
                raise ValueError("'api_key' must be a string")
            kind = ReplicaKind(body.get("kind", "fleetserve"))
            replica = gw.add_replica(body["url"], kind, trusted=False, api_key=api_key)
        except (ValueError, TypeError) as exc:
            raise HttpError(
                400,
                f"expected {{'url': 'http://HOST:PORT', 'kind': 'fleetserve' | 'openai', "
                f"'api_key': optional}}: {exc}",
                "invalid_request_error",
            ) from None
        return JSONResponse(_describe(gw, replica), 201)

    @app.post("/admin/replicas/{replica_id}/{action}")
    async def replica_action(replica_id: str, action: str, request: Request) -> Response:
        authenticate_operator(gw, request, admin_api=True)
        replica = _replica_of(gw, replica_id)
        if action == "drain":
            gw.set_draining(replica.id, True)
        elif action == "undrain":
            gw.set_draining(replica.id, False)
        elif action == "remove":
            gw.remove_replica(replica.id)
        else:
            raise HttpError(
                404, f"unknown action {action!r} (drain, undrain, remove)", "not_found_error"
            )
        return JSONResponse(_describe(gw, replica))

    return app


ADMIN_BODY_LIMIT = 64 * 1024


def _replica_of(gw: Gateway, replica_id: str) -> Replica:
    replica = gw.replicas.get(replica_id)
    if replica is None:
        raise HttpError(404, f"no replica {replica_id!r}", "not_found_error")
    return replica


def _describe(gw: Gateway, replica: Replica) -> dict:
    view = replica.view(gw.clock())
    return {
        "id": replica.id,
        "url": replica.url,
        "kind": replica.kind.value,
        "pid": replica.pid,
        "state": replica.state,
        "failure": replica.failed,
        "ready": replica.ready,
        "down": replica.down,
        "draining": replica.draining,
        "accepting": view.accepting,
        "breaker": view.breaker_state.value,
        "outstanding": replica.outstanding,
        "running": replica.load.running,
        "waiting": replica.load.waiting,
        "cached_blocks": len(replica.prefix),
        "models": replica.model_ids,
    }


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _v2_path(model: str, version: str | None, leaf: str) -> str:
    """The replica path of a KServe v2 model route, from a checked model name and version
    (letters, digits, `_`, `.`, `-`, not starting with `.`); 400 otherwise."""
    for what, name in (("model name", model), ("model version", version)):
        if name is not None and not _NAME.fullmatch(name):
            raise HttpError(400, f"{what} {name[:64]!r} is not valid", "invalid_request_error")
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")
    return f"{path}/{leaf}" if leaf else path
