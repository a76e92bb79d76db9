"""The OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from fleetserve.server.chat import create_chat_completion
from fleetserve.server.completions import create_completion
from fleetserve.server.errors import APIError
from fleetserve.server.protocol import ChatCompletionRequest, CompletionRequest
from fleetserve.server.state import ServerState, get_state, require_api_key

State = Annotated[ServerState, Depends(get_state)]

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])

ERRORS = {
    400: {"description": "invalid field, or prompt too long for the context"},
    401: {"description": "missing or wrong API key"},
    404: {"description": "unknown model"},
    413: {"description": "request body over --max-body-bytes"},
    429: {"description": "waiting queue full (see Retry-After)"},
    503: {"description": "loading, draining, or the engine has stopped"},
}


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.settings.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "fleetserve",
        "root": state.settings.engine.model,
        "max_model_len": state.engine.max_model_len or None,
    }


@router.get("/models", responses={503: ERRORS[503]})
async def list_models(state: State) -> dict:
    state.check_model_loaded()
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/models/{model:path}", responses={404: ERRORS[404], 503: ERRORS[503]})
async def retrieve_model(model: str, state: State) -> dict:
    state.check_model_loaded()
    if model != state.settings.served_model_name:
        raise APIError(
            404, f"The model `{model}` does not exist", param="model", code="model_not_found"
        )
    return _model_card(state)


@router.post("/completions", responses=ERRORS, response_model=None)
async def completions(req: CompletionRequest, raw: Request, state: State) -> Response | dict:
    return await create_completion(req, raw, state)


@router.post("/chat/completions", responses=ERRORS, response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, raw: Request, state: State
) -> Response | dict:
    return await create_chat_completion(req, raw, state)
