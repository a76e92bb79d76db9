"""The Open Inference Protocol (KServe v2) REST routes, so that `tritonclient.http` and
KServe clients work unmodified. Errors here are the protocol's `{"error": "..."}`."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from fleetserve.server.errors import APIError
from fleetserve.server.state import require_api_key
from fleetserve.tensor import kserve
from fleetserve.tensor.handlers import BadInput
from fleetserve.tensor.inference import get_state, infer, small_body
from fleetserve.tensor.state import TensorState

logger = logging.getLogger(__name__)
State = Annotated[TensorState, Depends(get_state)]
SERVER_VERSION = "0.1.0"

router = APIRouter(tags=["kserve-v2"])
client = [Depends(require_api_key)]

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": {"type": "object"}},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                        "parameters": {"type": "object"},
                    },
                }
            }
        },
    }
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@router.get("/v2")
async def server_metadata() -> dict:
    return {"name": "fleetserve", "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live")
async def live() -> dict:
    """200 while the process answers."""
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(state: State) -> Response:
    try:
        state.check_ready()
    except APIError as exc:
        return _error(exc.status, exc.message)
    return JSONResponse({"ready": True})


def _check_name(state: TensorState, name: str, version: str | None) -> JSONResponse | None:
    if name != state.settings.served_model_name:
        return _error(
            404, f"unknown model {name!r}; this server has {state.settings.served_model_name!r}"
        )
    if version not in (None, "1"):
        return _error(404, f"model {name!r} has only version '1'")
    return None


@router.get("/v2/models/{name}", dependencies=client)
@router.get("/v2/models/{name}/versions/{version}", dependencies=client)
async def model_metadata(name: str, state: State, version: str | None = None) -> Response:
    if (wrong := _check_name(state, name, version)) is not None:
        return wrong
    if state.handler is None:
        return _error(503, "the model is loading")
    handler = state.handler
    return JSONResponse(
        {
            "name": name,
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": [s.metadata() for s in handler.inputs],
            "outputs": [s.metadata() for s in handler.outputs],
        }
    )


@router.get("/v2/models/{name}/ready", dependencies=client)
@router.get("/v2/models/{name}/versions/{version}/ready", dependencies=client)
async def model_ready(name: str, state: State, version: str | None = None) -> Response:
    if (wrong := _check_name(state, name, version)) is not None:
        return wrong
    try:
        state.check_ready()
    except APIError as exc:
        return _error(exc.status, exc.message)
    return JSONResponse({"name": name, "ready": True})


def _decode(body: bytes, header_length: str | None) -> tuple[dict, dict]:
    """`kserve.decode_request`, with any failure a `BadInput`: whatever the decoder missed, it
    was the body's fault, so the client gets a 400 and the log keeps the traceback."""
    try:
        return kserve.decode_request(body, header_length)
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - a body the decoder did not foresee
        logger.exception("a KServe v2 body failed to decode")
        raise BadInput(f"the body could not be decoded: {type(exc).__name__}: {exc}") from None


@router.post("/v2/models/{name}/infer", dependencies=client, openapi_extra=INFER_BODY)
@router.post(
    "/v2/models/{name}/versions/{version}/infer", dependencies=client, openapi_extra=INFER_BODY
)
async def model_infer(
    name: str, request: Request, state: State, version: str | None = None
) -> Response:
    if (wrong := _check_name(state, name, version)) is not None:
        return wrong
    body = await request.body()
    try:
        state.check_ready()
        # a large body off the loop: 3.8 MB take 0.29 s, and the replica would answer
        # nothing meanwhile; a small one on it (the hop to a thread costs more)
        length = request.headers.get(kserve.HEADER_LENGTH)
        inline = small_body(request, len(body))
        if inline:
            header, tensors = _decode(body, length)
        else:
            header, tensors = await asyncio.to_thread(_decode, body, length)
        handler = state.handler
        payload, _ = await infer(
            state,
            lambda: handler.rows_from_tensors(tensors),
            lambda outputs: kserve.encode_response(name, header, handler.to_tensors(outputs)),
            inline=inline,
            receive=request.receive,
        )
    except BadInput as exc:
        return _error(400, str(exc))
    except APIError as exc:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
    content, headers = payload
    media = "application/octet-stream" if headers else "application/json"
    return Response(content, media_type=media, headers=headers)
