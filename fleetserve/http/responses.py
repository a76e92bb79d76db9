"""A streamed response whose clean-up always runs."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    """A `StreamingResponse` that calls `on_close()` however it ends, also when the client
    left before the body iterator took its first step: Starlette then cancels the body task
    before it starts, so the iterator's own `finally` never runs, and whatever the request
    held (queue places, a replica slot, an upstream stream, a subscription) would leak.
    `on_close` may be a coroutine function; it runs shielded from cancellation, and must be
    idempotent when the body's `finally` also releases."""

    def __init__(
        self, content: Any, *, on_close: Callable[[], Awaitable[None] | None], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                result = self.on_close()
                if inspect.isawaitable(result):
                    await result
