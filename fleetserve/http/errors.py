"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


def error_type(status: int) -> str:
    """The OpenAI error type of an HTTP status."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")


def error_body(
    message: str, err_type: str, param: str | None = None, code: str | int | None = None
) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
