"""One inference through the batcher, as every route does it: admission, preprocessing, the
batch, the answer, and the errors a client can cause mapped to HTTP statuses.

Where the time goes on a small request (a short sentence: ~0.1 ms to tokenize, a 384-float
answer): each hop to a thread and back costs more than the work, and at one client the hops
are the latency. So a small body is preprocessed and its answer built on the event loop; a
large one (a long document, a big tensor) goes to a thread, where it cannot stall the loop.
A user's own `preprocess` or `postprocess` always runs on a thread: it may do anything.

While a request waits for its batch, a watcher listens for the client's disconnect: a client
that leaves takes its request out of the queue (it never runs, and is counted "cancelled").
Starlette itself does not cancel a route whose client has gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.types import Receive

from fleetserve.server.errors import APIError, invalid
from fleetserve.tensor.batcher import QueueFull, TooLarge
from fleetserve.tensor.handlers import BadInput
from fleetserve.tensor.state import TensorState
from fleetserve.tensor.workers import ClientLeft, ModelRefused, QueueTimeout

T = TypeVar("T")
RETRY_AFTER_S = "1"
INLINE_BODY_BYTES = 8192  # a body up to this size is preprocessed on the event loop
INLINE_OUTPUT_ELEMENTS = 16384  # an answer of up to this many numbers is built there too
CLIENT_CLOSED = 499  # nginx's status for a request whose client left; nobody reads it


async def get_state(request: Request) -> TensorState:
    """A coroutine, not a plain function: FastAPI would run that on a thread pool, one more
    hand-off per request."""
    return request.app.state.server


def small_body(request: Request, size: int | None = None) -> bool:
    """Whether the request's body (`size` bytes, else its Content-Length) is small enough to
    be preprocessed on the event loop."""
    if size is None:
        length = request.headers.get("content-length", "")
        size = int(length) if length.isascii() and length.isdigit() else INLINE_BODY_BYTES + 1
    return size <= INLINE_BODY_BYTES


async def infer(
    state: TensorState,
    to_rows: Callable[[], list],
    to_answer: Callable[[list], T],
    priority: int = 0,
    *,
    inline: bool = False,
    receive: Receive | None = None,
) -> tuple[T, list]:
    """(`to_answer(outputs)`, the rows). `to_rows()` may tokenize: on the loop when `inline`
    (a small body) and the handler's preprocessing is its own, else on a thread; a
    `BadInput` from either is a 400 naming the problem. `receive` (the ASGI channel, its body
    already read) tells when the client leaves. Every request is counted once in `finished`,
    under the way it ended (a client that left is "cancelled")."""
    state.check_ready()
    if priority and not state.settings.allow_client_priority:
        raise invalid(
            "this server ignores client priorities (start it with --allow-client-priority)",
            "priority",
        )
    arrival = time.monotonic()
    metrics, name = state.metrics, state.metrics.model_name
    handler = state.handler
    state.enter()
    reason = "error"  # unless it ends one of the ways below
    watcher = None
    try:
        if inline and handler.inline_preprocess:
            rows = to_rows()
        else:
            rows = await asyncio.to_thread(to_rows)
        key = handler.key(rows)
        if receive is not None:
            watcher = asyncio.ensure_future(_disconnect(receive))
        outputs = await state.workers.infer(rows, key, priority, gone=watcher)
        if handler.inline_postprocess and _elements(outputs) <= INLINE_OUTPUT_ELEMENTS:
            answer = to_answer(outputs)
        else:
            answer = await asyncio.to_thread(to_answer, outputs)
        reason = "ok"
        return answer, rows
    except asyncio.CancelledError:  # the client left (the server cancelled the route)
        reason = "cancelled"
        raise
    except ClientLeft as exc:  # the client left while its request waited: it never ran
        reason = "cancelled"
        raise APIError(CLIENT_CLOSED, str(exc), code="client_closed") from None
    except (BadInput, ModelRefused, TooLarge) as exc:
        reason = "bad_input"
        raise APIError(400, str(exc), code="invalid_value") from None
    except QueueFull as exc:
        reason = "queue_full"
        raise APIError(
            429,
            f"too many requests waiting ({exc}); retry later",
            code="queue_full",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
    except QueueTimeout as exc:
        reason = "timeout"
        raise APIError(
            503,
            f"not served in time: {exc}",
            code="queue_timeout",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
    finally:
        if watcher is not None:
            watcher.cancel()
        state.leave()
        if reason != "timeout":  # the worker counted that one
            metrics.finished.labels(name, reason).inc()
        if reason == "ok":
            metrics.e2e.labels(name).observe(time.monotonic() - arrival)


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has closed its connection (the body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _elements(outputs: list[Any]) -> int:
    """How many numbers `outputs` hold; unbounded for anything but tensors and arrays."""
    total = 0
    for output in outputs:
        size = getattr(output, "numel", None) or getattr(output, "size", None)
        if size is None:
            return INLINE_OUTPUT_ELEMENTS + 1
        total += size() if callable(size) else int(size)
    return total
