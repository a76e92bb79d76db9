"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` for every 4xx/5xx
this server sends, including FastAPI's own validation errors (400 here, not 422)."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetserve.http import errors as http_errors

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error for the client. Raised anywhere in a route; rendered by `install`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    """The body of an error with HTTP `status` (its OpenAI type follows from it)."""
    return http_errors.error_body(message, http_errors.error_type(status), param, code)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


# Where a union field failed, pydantic's location names the member ("str", "list[int]",
# "function-after[...]"): not something a client sent.
_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _where(loc) -> str:
    parts = [
        str(p)
        for p in loc
        if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_MEMBERS))
    ]
    return ".".join(parts)


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _where(first.get("loc", ())) or None
    lines = dict.fromkeys(f"{_where(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors)
    message = "; ".join(list(lines)[:3])
    return JSONResponse(error_body(400, message or "invalid request", param, "invalid_value"), 400)


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) else phrase
    code = phrase.lower().replace(" ", "_")
    return JSONResponse(
        error_body(exc.status_code, message, None, code),
        exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=exc)
    return JSONResponse(error_body(500, "internal server error", None, "internal_error"), 500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, lambda _, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
