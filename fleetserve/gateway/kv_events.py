"""Mirrors a fleetserve replica's prefix cache from its `GET /v1/kv_events` stream.

On every (re)connection the mirror starts empty: events missed while disconnected cannot be
replayed, and an empty mirror only under-predicts hits (a safe error for routing).
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx

from fleetserve.gateway.replica import Replica
from fleetserve.http.sse import iter_sse_data

logger = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0


async def kv_event_loop(replica: Replica, client: httpx.AsyncClient) -> None:
    """Follow `replica`'s KV events into `replica.prefix` until cancelled, reconnecting
    with backoff."""
    delay = RECONNECT_MIN_S
    warned = False
    while True:
        try:
            url = f"{replica.url}/v1/kv_events"
            async with client.stream("GET", url, headers=replica.auth_headers) as resp:
                if resp.status_code in (401, 403) and not warned:
                    warned = True
                    logger.warning(
                        "replica %s refuses its KV events (%d): the gateway's upstream key must "
                        "be the replica's --operator-key; prefix routing is blind to it",
                        replica.id,
                        resp.status_code,
                    )
                if resp.status_code == 404:
                    logger.warning(
                        "replica %s publishes no KV events; prefix routing is blind to it",
                        replica.id,
                    )
                    return
                if resp.status_code == 200:
                    replica.prefix.clear()
                    delay = RECONNECT_MIN_S
                    async for data in iter_sse_data(resp.aiter_lines()):
                        replica.prefix.apply(json.loads(data))
        except asyncio.CancelledError:
            raise
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("KV events of replica %s: %s", replica.id, exc)
        replica.prefix.clear()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)
