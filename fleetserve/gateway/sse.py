"""Server-sent events: parsing an upstream stream's `data:` payloads, and writing ours."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

DONE = "[DONE]"


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each event (multi-line data joined by newlines); comments and other
    fields are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def encode_event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


DONE_EVENT = encode_event(DONE)


def error_body(message: str, err_type: str, code: int) -> dict:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}
