"""The plumbing between HTTP requests and engine streams. Server-sent events and "stop
unless the client left" are `fleetserve.http`'s, shared with the gateway; they are imported
here under the names the routes use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from fleetserve.http.disconnect import ClientDisconnected, unless_disconnected
from fleetserve.http.sse import SSE_DONE, SSE_HEADERS
from fleetserve.http.sse import sse_event as sse

__all__ = ["SSE_DONE", "SSE_HEADERS", "ClientDisconnected", "merge", "sse", "unless_disconnected"]

T = TypeVar("T")


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.
    Closing the merge closes (cancels) every source."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
