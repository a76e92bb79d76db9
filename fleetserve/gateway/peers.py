"""Peer regions as one gateway sees them: what each last reported, the measured round trip,
health, and the prompt blocks this gateway sent there.

`RegionReport` is the typed message of a gateway's `GET /region/state` (served to its peers
behind the peer key). `Peer` is the bookkeeping (pure: time comes in as `now`); `poll_loop`
does the I/O: every `poll_interval_s` it asks the peer for its report with a deadline, times
the round trip (a moving average of them is the RTT the regional policy uses) and marks the
peer unhealthy after `unhealthy_after` failed polls in a row, healthy again after a success.

Between two polls a busy origin may send a peer many requests; the peer's report is then
stale. `Peer.predicted_wait` adds what this gateway sent since the report to the peer's
queue, with the peer's own slot count and mean service time, so a burst does not pile onto
a peer that looked idle a second ago.

Prefix preference costs no extra traffic: the gateway remembers the hash chain of each
prompt it sent to a peer (bounded, least recently used first out) and matches a new
prompt's chain against it, as the replica prefix index does with KV events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import httpx

from fleetserve.gateway.prefix_index import leading_blocks
from fleetserve.gateway.regional_config import PeerConfig, RegionsConfig, check_region_name
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.regions.policy import RegionView

logger = logging.getLogger(__name__)

STATE_PATH = "/region/state"
# A report is a few hundred bytes: a peer answering more is broken (or hostile), and its
# answer is not read past this.
MAX_STATE_BYTES = 64 * 1024
# No region has more replicas, slots or queued requests than this; a larger count is junk
# (and 10**400 would overflow the policy's float arithmetic on every request).
MAX_COUNT = 10**9
# Nor waits or service times longer than a year (infinity is `predicted_wait_s: null`).
MAX_SECONDS = 365 * 86400.0


@dataclass(frozen=True)
class RegionReport:
    """A gateway's own region, for its peers: can it serve, and how long would a new
    request wait there."""

    region: str
    can_serve: bool  # some replica accepts work (or one starts on demand)
    predicted_wait_s: float  # for a fresh request now (inf: no capacity)
    replicas: int  # replicas accepting work
    slots: int  # request slots of those replicas
    free_slots: int
    queue_length: int
    mean_service_s: float  # how long a request holds a slot (the wait estimator's mean)
    block_size: int | None = None  # of its replicas' prefix caches, when known

    def to_json(self) -> dict:
        out = asdict(self)
        if not math.isfinite(self.predicted_wait_s):
            out["predicted_wait_s"] = None  # JSON has no infinity
        return out

    @classmethod
    def from_json(cls, data: object) -> RegionReport:
        """Raises ValueError for anything but a well-formed report."""
        if not isinstance(data, dict):
            raise ValueError("the state is not a JSON object")
        wait = data.get("predicted_wait_s")
        try:
            report = cls(
                region=check_region_name(data.get("region")),
                can_serve=_typed(data, "can_serve", bool),
                predicted_wait_s=math.inf if wait is None else _number(data, "predicted_wait_s"),
                replicas=_count(data, "replicas"),
                slots=_count(data, "slots"),
                free_slots=_count(data, "free_slots"),
                queue_length=_count(data, "queue_length"),
                mean_service_s=_number(data, "mean_service_s"),
                block_size=None if data.get("block_size") is None else _count(data, "block_size"),
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        return report


def _typed(data: dict, key: str, kind: type) -> object:
    value = data.get(key)
    if not isinstance(value, kind):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def _number(data: dict, key: str) -> float:
    value = data.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (0 <= value <= MAX_SECONDS)
    ):
        raise ValueError(f"{key} must be a number of seconds 0 .. {MAX_SECONDS:g}, got {value!r}")
    return float(value)


def _count(data: dict, key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{key} must be an integer 0 .. {MAX_COUNT}, got {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)  # (a huge int's repr is slow past 4300 digits, and refused)
    return text if len(text) <= 40 else f"{text[:37]}..."


class SentPrefixes:
    """The prompt blocks (hash chains, one block size) this gateway sent to one peer: at most
    `max_blocks`, the least recently used forgotten first. A guess of the peer's cache, as
    good as the peer's cache is large: it never hears of evictions."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.block_size: int | None = None
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def set_block_size(self, block_size: int | None) -> None:
        if block_size != self.block_size:
            self._blocks.clear()  # hashes of another block size never match
            self.block_size = block_size

    def remember(self, block_hashes: Sequence[int]) -> None:
        for h in block_hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def match_prefix(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of the chain sent there before. Read-only."""
        return leading_blocks(block_hashes, self._blocks)


class Peer:
    """One peer region's gateway. Unhealthy until its first poll succeeds."""

    def __init__(self, config: PeerConfig, regions: RegionsConfig) -> None:
        self.config = config
        self.name = config.name
        self.url = config.url
        self.unhealthy_after = regions.unhealthy_after
        self.rtt_alpha = regions.rtt_alpha
        self.rtt_s: float | None = config.rtt_s
        self.healthy = False
        self.failures = 0  # failed polls (or spills) in a row
        self.last_error = "not polled yet"
        self.report: RegionReport | None = None
        self.reported_at: float | None = None
        self.sent_since_report = 0  # requests this gateway sent there since that report
        self.in_flight = 0  # requests this gateway has there now
        self.prefixes = SentPrefixes(regions.max_prefix_blocks)

    # ---- polls -------------------------------------------------------------------------------

    def poll_succeeded(self, report: RegionReport, rtt_s: float, now: float) -> None:
        if report.region != self.name:
            self.poll_failed(f"it says it is region {report.region!r}, not {self.name!r}")
            return
        if self.rtt_s is None:
            self.rtt_s = rtt_s
        else:  # from the operator's estimate, or the average so far
            self.rtt_s += self.rtt_alpha * (rtt_s - self.rtt_s)
        if not self.healthy:
            logger.info("peer %s healthy (round trip %.0f ms)", self.name, rtt_s * 1000)
        self.healthy = True
        self.failures = 0
        self.report = report
        self.reported_at = now
        self.sent_since_report = 0
        self.prefixes.set_block_size(report.block_size)

    def poll_failed(self, why: str) -> None:
        """A failed poll, or a spill that failed before its first byte."""
        self.failures += 1
        self.last_error = why
        if self.healthy and self.failures >= self.unhealthy_after:
            logger.warning("peer %s unhealthy after %d failures: %s", self.name, self.failures, why)
            self.healthy = False
        elif not self.healthy and self.failures in (1, 10) or self.failures % 100 == 0:
            logger.info("peer %s not reachable (%d failures): %s", self.name, self.failures, why)

    # ---- what the policy reads ---------------------------------------------------------------

    def predicted_wait(self) -> float:
        """The reported wait, plus the requests sent there since the report (see module doc)."""
        report = self.report
        if report is None or not report.can_serve:
            return math.inf
        extra = self.sent_since_report
        if report.slots == 0:  # starting a replica: its cold start, then one at a time
            return report.predicted_wait_s + extra * report.mean_service_s
        ahead = report.queue_length + extra - report.free_slots
        if ahead < 0:
            return 0.0
        return (ahead + 1) * report.mean_service_s / report.slots

    def cached_tokens(self, request: RouteRequest) -> int:
        block_size = self.prefixes.block_size
        if not block_size:
            return 0
        return self.prefixes.match_prefix(request.block_hashes(block_size)) * block_size

    @property
    def serving(self) -> bool:
        """It answers its polls and says it can serve."""
        return self.healthy and self.report is not None and self.report.can_serve

    def view(self, request: RouteRequest) -> RegionView:
        return RegionView(
            name=self.name,
            rtt_s=self.rtt_s or 0.0,
            predicted_wait_s=self.predicted_wait(),
            healthy=self.serving,
            cached_prefix_tokens=self.cached_tokens(request),
        )

    # ---- requests sent there -----------------------------------------------------------------

    def sent(self, request: RouteRequest) -> None:
        self.sent_since_report += 1
        self.in_flight += 1
        if self.prefixes.block_size:
            self.prefixes.remember(request.block_hashes(self.prefixes.block_size))

    def done(self) -> None:
        self.in_flight = max(self.in_flight - 1, 0)

    def describe(self) -> dict:
        report = self.report
        wait = self.predicted_wait()
        # /health is open: no URLs or error texts (they name hosts) here; they are logged.
        return {
            "healthy": self.healthy,
            "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 1),
            "predicted_wait_s": round(wait, 4) if math.isfinite(wait) else None,
            "can_serve": report.can_serve if report else None,
            "replicas": report.replicas if report else None,
            "in_flight": self.in_flight,
        }


async def poll_loop(
    peer: Peer,
    client: httpx.AsyncClient,
    headers: dict[str, str],
    *,
    interval_s: float,
    timeout_s: float,
    clock: Callable[[], float],
) -> None:
    """Poll `peer` every `interval_s` until cancelled (see the module doc)."""
    while True:
        try:
            await poll_once(peer, client, headers, timeout_s, clock)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not stop the polls
            logger.exception("poll of peer %s crashed", peer.name)
        await asyncio.sleep(interval_s)


async def _get_state(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> bytes:
    """The body of a 200 answer, at most `MAX_STATE_BYTES` of it (ValueError past that, or
    for any other status: a redirect is not followed)."""
    async with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code != 200:
            raise ValueError(f"{STATE_PATH} answered {resp.status_code}")
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > MAX_STATE_BYTES:
                raise ValueError(f"{STATE_PATH} answered more than {MAX_STATE_BYTES} bytes")
    return bytes(body)


async def poll_once(
    peer: Peer,
    client: httpx.AsyncClient,
    headers: dict[str, str],
    timeout_s: float,
    clock: Callable[[], float],
) -> bool:
    started = clock()
    try:
        async with asyncio.timeout(timeout_s):
            body = await _get_state(client, f"{peer.url}{STATE_PATH}", headers)
        rtt = clock() - started
        try:
            data = json.loads(body)
        except RecursionError:  # within the size limit, nested past the parser's depth
            raise ValueError("the state is nested too deeply") from None
        report = RegionReport.from_json(data)
    except TimeoutError:
        peer.poll_failed(f"no answer within {timeout_s:.1f}s")
        return False
    except (httpx.HTTPError, ValueError) as exc:
        peer.poll_failed(str(exc) or type(exc).__name__)
        return False
    peer.poll_succeeded(report, rtt, clock())
    return peer.healthy
