"""Active health probes: every `probe_interval_s`, each replica must generate one token
(a tensor-model replica, whose /health names its task, is judged by its /health alone).

A ping proves the HTTP server is up; one token proves the engine behind it runs. A fleetserve
replica's `/health` is asked first (503 means not ready: loading, draining, engine dead) and
its `/metrics` are scraped for load. A probe that times out while the replica is visibly
streaming tokens to this gateway is not held against it (it is busy, not broken).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.gateway.replica import LoadStats, Replica

logger = logging.getLogger(__name__)

PROBE_PROMPT = "Hello"


async def probe_loop(
    replica: Replica,
    client: httpx.AsyncClient,
    *,
    interval_s: float,
    timeout_s: float,
    clock: Callable[[], float],
    on_change: Callable[[], None],
) -> None:
    """Probe `replica` every `interval_s` until cancelled; see `probe_once`."""
    while True:
        try:
            await probe_once(replica, client, timeout_s, clock, on_change)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not silence the probes
            logger.exception("probe of replica %s crashed", replica.id)
        await asyncio.sleep(interval_s)


async def probe_once(
    replica: Replica,
    client: httpx.AsyncClient,
    timeout: float,
    clock: Callable[[], float],
    on_change: Callable[[], None],
) -> bool:
    """Probe now; updates `replica.ready`, its breaker and its load, then calls `on_change`
    (the replica may have become usable). Returns the verdict."""
    ok, why = False, ""
    auth = replica.auth_headers
    try:
        async with asyncio.timeout(timeout):
            tensor_model = False
            if replica.supports_extensions:
                health = await client.get(f"{replica.url}/health", headers=auth)
                if health.status_code != 200:
                    raise _NotReady(f"/health answered {health.status_code}")
                tensor_model = _serves_tensor_model(health)
            if not replica.model_ids:
                models = await client.get(f"{replica.url}/v1/models", headers=auth)
                if models.status_code == 200:
                    replica.model_ids = [m["id"] for m in models.json().get("data", [])]
            if not tensor_model:
                await _generate_one_token(replica, client, auth)
            ok = True
            if replica.supports_extensions:
                load = await scrape_load(client, replica.url, auth)
                if load.refused and not replica.load.refused:  # once, not every probe
                    logger.warning(
                        "replica %s refuses its /metrics: the gateway's upstream key must be "
                        "the replica's --operator-key; routing does not see its load",
                        replica.id,
                    )
                replica.load = load
    except TimeoutError:
        why = f"no answer within {timeout:.1f}s"
    except (_NotReady, httpx.HTTPError, ValueError, KeyError, AttributeError) as exc:
        why = str(exc) or type(exc).__name__
    now = clock()
    was_ready = replica.ready
    if ok:
        replica.ready = True
        replica.breaker.record_success(now)
    elif (
        why.startswith("no answer") and replica.outstanding and replica.busy_recently(now, timeout)
    ):
        logger.info("probe of busy replica %s timed out; not held against it", replica.id)
        return replica.ready
    else:
        replica.ready = False
        replica.breaker.record_failure(now)
    if was_ready != replica.ready:
        level = logging.INFO if replica.ready else logging.WARNING
        logger.log(level, "replica %s %s%s", replica.id, "ready" if ok else "not ready: ", why)
    on_change()
    return ok


class _NotReady(Exception):
    pass


async def _generate_one_token(
    replica: Replica, client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    body = {"prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0.0, "stream": False}
    if replica.model_ids:
        body["model"] = replica.model_ids[0]
    answer = await client.post(
        f"{replica.url}/v1/completions",
        json=body,
        headers={**auth, "X-Request-Id": f"probe-{uuid.uuid4().hex[:12]}"},
    )
    if answer.status_code != 200:
        raise _NotReady(f"one-token generation answered {answer.status_code}")


def _serves_tensor_model(health: httpx.Response) -> bool:
    """A tensor-model replica's /health names its task (embed, classify, tensor): it generates
    no token, and its 200 already says its model workers run and no batch is stuck."""
    try:
        task = health.json().get("task")
    except (ValueError, AttributeError):
        return False
    return task not in (None, "generate")


async def scrape_load(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> LoadStats:
    """Running/waiting requests and KV usage from a fleetserve replica's /metrics."""
    resp = await client.get(f"{url}/metrics", headers=headers)
    stats = LoadStats()
    if resp.status_code != 200:
        stats.refused = resp.status_code in (401, 403)
        return stats
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == "fleetserve:num_requests_running":
                stats.running += int(sample.value)
            elif sample.name == "fleetserve:num_requests_waiting":
                stats.waiting += int(sample.value)
            elif sample.name == "fleetserve:kv_cache_usage_perc":
                stats.kv_cache_usage = float(sample.value)
    return stats
