"""One inference through the batcher, as every route does it: admission, preprocessing off
the event loop, the batch, and the errors a client can cause mapped to HTTP statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request

from fleetserve.server.errors import APIError, invalid
from fleetserve.tensor.batcher import QueueFull, TooLarge
from fleetserve.tensor.handlers import BadInput
from fleetserve.tensor.state import TensorState
from fleetserve.tensor.workers import ModelRefused, QueueTimeout

T = TypeVar("T")
RETRY_AFTER_S = "1"


def get_state(request: Request) -> TensorState:
    return request.app.state.server


async def infer(
    state: TensorState,
    to_rows: Callable[[], list],
    to_answer: Callable[[list], T],
    priority: int = 0,
) -> tuple[T, list]:
    """(`to_answer(outputs)`, the rows). `to_rows()` runs on a thread (it may
    tokenize); a `BadInput` from either is a 400 naming the problem. Every request is counted
    once in `finished`, under the way it ended (a client that left is "cancelled")."""
    state.check_ready()
    if priority and not state.settings.allow_client_priority:
        raise invalid(
            "this server ignores client priorities (start it with --allow-client-priority)",
            "priority",
        )
    arrival = time.monotonic()
    metrics, name = state.metrics, state.metrics.model_name
    state.enter()
    reason = "error"  # unless it ends one of the ways below
    try:
        rows = await asyncio.to_thread(to_rows)
        key = state.handler.key(rows)
        outputs = await state.workers.infer(rows, key, priority)
        answer = await asyncio.to_thread(to_answer, outputs)
        reason = "ok"
        return answer, rows
    except asyncio.CancelledError:  # the client left
        reason = "cancelled"
        raise
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
        state.leave()
        if reason != "timeout":  # the worker counted that one
            metrics.finished.labels(name, reason).inc()
        if reason == "ok":
            metrics.e2e.labels(name).observe(time.monotonic() - arrival)
