"""The request id both doors take from a client's X-Request-Id, or make."""

from __future__ import annotations

import uuid

MAX_REQUEST_ID_LEN = 256


def request_id_or_new(given: str | None) -> str:
    """The client's X-Request-Id when it is a short printable ASCII token (it is echoed in a
    header, sent upstream in one, and put in response ids), else a fresh one."""
    given = (given or "").strip()
    if 0 < len(given) <= MAX_REQUEST_ID_LEN and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex
