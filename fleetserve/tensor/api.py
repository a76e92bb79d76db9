"""Client routes of a tensor-model replica: `POST /predict` (the seed's JSON contract),
`POST /v1/embeddings` (OpenAI's shape) and `GET /v1/models`."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from fleetserve.server.errors import invalid
from fleetserve.server.state import require_api_key
from fleetserve.tensor.handlers import TextHandler
from fleetserve.tensor.inference import get_state, infer, small_body
from fleetserve.tensor.jsonout import json_response
from fleetserve.tensor.state import TensorState

State = Annotated[TensorState, Depends(get_state)]
router = APIRouter(dependencies=[Depends(require_api_key)])

MAX_PRIORITY = 2**31 - 1


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Any = Field(
        description="One request's inputs: a list of rows for a tensor model (the batch "
        "dimension first), a string or list of strings for a text model, or what the "
        "--handler module's preprocess takes."
    )
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="lower runs first")


@router.post("/predict", tags=["tensor"])
async def predict(body: PredictRequest, state: State, request: Request) -> Response:
    """The model's answer for `inputs`, batched with other requests behind the scenes.
    Non-finite floats in `outputs` are the strings "NaN", "Infinity", "-Infinity"."""
    state.check_ready()
    handler = state.handler
    name = state.settings.served_model_name
    response, _ = await infer(
        state,
        lambda: handler.rows_from_json(body.inputs),
        lambda outputs: json_response({"model": name, "outputs": handler.to_json(outputs)}),
        body.priority,
        inline=small_body(request),
        receive=request.receive,
    )
    return response


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]  # true is no token id
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


@router.post("/v1/embeddings", tags=["tensor"])
async def embeddings(body: EmbeddingRequest, state: State, request: Request) -> Response:
    """OpenAI's embeddings API: texts (or token-id lists) in, one vector each out; base64 is
    the little-endian float32 bytes."""
    state.check_ready()
    name = state.check_model(body.model)
    handler = state.handler
    if handler.task != "embed":
        raise invalid(f"this server's model is a {handler.task} model, not an embedding model")
    if body.dimensions is not None:
        raise invalid("this model has no reduced dimensions; leave 'dimensions' out", "dimensions")
    rows_of = _rows_maker(handler, body.input)
    rows: list = []

    def answer(vectors: list) -> Response:
        data = []
        for i, vector in enumerate(vectors):
            values = vector.numpy().astype(np.float32)
            embedding: Any = (
                base64.b64encode(values.astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else values.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(row) for row in rows)
        return json_response(
            {
                "object": "list",
                "data": data,
                "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def to_rows() -> list:
        rows.extend(rows_of())
        return rows

    response, _ = await infer(
        state, to_rows, answer, inline=small_body(request), receive=request.receive
    )
    return response


def _rows_maker(handler: TextHandler, value: Any):
    """Texts are tokenized; token-id lists are checked against the vocabulary and length."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
        return lambda: handler.rows_from_json(value)
    rows = [value] if value and isinstance(value[0], int) else value
    if not rows or any(not row for row in rows):
        raise invalid("'input' must not be empty", "input")
    vocab = handler.tokenizer.get_vocab_size()
    for row in rows:
        if len(row) > handler.max_length:
            raise invalid(
                f"an input has {len(row)} tokens, more than this model's {handler.max_length}",
                "input",
            )
        if min(row) < 0 or max(row) >= vocab:
            raise invalid(f"token ids must be in [0, {vocab})", "input")
    return lambda: rows


@router.get("/v1/models", tags=["tensor"])
async def models(state: State) -> dict:
    if state.handler is None:  # loading, or failed to: no model to list yet
        state.check_ready()
    return {
        "object": "list",
        "data": [
            {
                "id": state.settings.served_model_name,
                "object": "model",
                "created": state.created,
                "owned_by": "fleetserve",
                "task": state.handler.task,
            }
        ],
    }
