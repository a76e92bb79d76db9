"""Server-sent events: writing ours (`data: {compact JSON}\n\n`, ending in `[DONE]` as
OpenAI's streams do) and reading an upstream stream's `data:` payloads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

DONE = "[DONE]"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict | str) -> str:
    """One event; a dict is sent as compact JSON, a string as it is."""
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    )
    return f"data: {data}\n\n"


def encode_event(payload: dict | str) -> bytes:
    return sse_event(payload).encode()


SSE_DONE = sse_event(DONE)
DONE_EVENT = SSE_DONE.encode()


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
