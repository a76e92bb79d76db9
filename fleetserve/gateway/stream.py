"""One streamed response: retries before the first event, migration after it.

```
open():  acquire a replica ─▶ POST (stream) ─▶ first event ──▶ HTTP 200 starts
              ▲   retry on another replica,        │
              └── backoff, while nothing was sent ◀┘ failure
body():  events ─▶ client ... replica dies / stalls / sends an error / is evicted
              ─▶ continuation on another replica (prompt ids + tokens sent so far)
              ─▶ its chunks re-wrapped as the client's stream ... [DONE]
```

An evicted replica (a scale-down past its drain deadline) is left at an event boundary:
the event just read is passed on, the upstream request is closed (the replica aborts it)
and the stream continues elsewhere, so no token is lost or repeated and it is not counted
as the replica's failure. A stream that cannot migrate, or has no other replica to go to
now, stays where it is.

The bookkeeping of what the client got, and the rewriting of events, is `StreamState`'s
(pure); this file does the I/O around it. Only single-choice streams (n == 1) from
fleetserve replicas migrate; others end with an error event when their replica fails
mid-stream. A client that leaves closes the upstream response, which aborts the request on
the replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import anyio

from fleetserve.gateway.context import RequestContext
from fleetserve.gateway.gateway import DeadlineExceeded, Gateway, NoReplica, Outcome, Shed
from fleetserve.gateway.replica import Replica
from fleetserve.gateway.stream_state import StreamState
from fleetserve.gateway.upstream import UpstreamError, UpstreamStream, open_stream
from fleetserve.http.errors import error_body
from fleetserve.http.sse import DONE_EVENT, encode_event

logger = logging.getLogger(__name__)

CLEANUP_TIMEOUT_S = 5.0


class Unrecoverable(Exception):
    """The stream broke after its first byte and cannot be continued."""


class StreamSession:
    def __init__(self, gw: Gateway, ctx: RequestContext) -> None:
        self.gw = gw
        self.ctx = ctx
        self.state = StreamState(ctx.body, ctx.chat, ctx.request_id)
        self.replica: Replica | None = None
        self.upstream: UpstreamStream | None = None
        self.attempt = 0  # upstream calls so far, retries and continuations included
        self.attempt_started = 0.0
        self.events_this_attempt = 0
        self.retries = 0
        self.migrations = 0
        self.status = "200"
        self.first_token_at: float | None = None
        self._closed = False

    # ---- before the first byte ---------------------------------------------------------------

    async def open(self) -> list[bytes]:
        """Events to send first; the HTTP response has not started yet. Raises `Shed`,
        `NoReplica`, `DeadlineExceeded` or `UpstreamError` when no replica could start the
        stream (the session is closed by then)."""
        try:
            replica = await self.gw.acquire(self.ctx.route, self.ctx.deadline)
            while True:
                try:
                    return await self._start(replica, self.ctx.endpoint, self._first_body(replica))
                except UpstreamError as exc:
                    # A timeout the client's own deadline caused is not the replica's failure.
                    past_deadline = self._past_deadline()
                    failed = exc.replica_failed and not past_deadline
                    await self._detach(Outcome.FAILURE if failed else Outcome.NEUTRAL)
                    self.ctx.exclude.add(replica.id)
                    if past_deadline:
                        raise DeadlineExceeded(str(exc)) from exc
                    if not exc.retryable or self.retries >= self.gw.config.max_retries:
                        raise
                    if not self.gw.allow_retry(self.ctx):
                        raise
                    self.retries += 1
                    self.gw.metrics.retries.labels(exc.reason).inc()
                    logger.info(
                        "request %s: retry %d after %s", self.ctx.request_id, self.retries, exc
                    )
                    await asyncio.sleep(self.gw.config.backoff(self.retries))
                    replica = await self.gw.route_now(
                        self.ctx.route_request(),
                        self.ctx.deadline,
                        fail_over=self.gw.can_fail_over(self.ctx.spilled_from),
                    )
        except BaseException as exc:
            self.ctx.local_failure = local_failure(exc)
            with anyio.CancelScope(shield=True):
                await self._close(ok=False, status=failure_status(exc))
            raise

    def _first_body(self, replica: Replica) -> dict:
        body = dict(self.ctx.body)
        if self.state.n == 1 and replica.supports_extensions:
            body["return_token_ids"] = True
        return body

    async def _start(self, replica: Replica, path: str, body: dict) -> list[bytes]:
        """Open a stream on `replica`; for the original request, read its first event too."""
        self.replica = replica
        self.attempt += 1
        self.attempt_started = self.gw.clock()
        self.events_this_attempt = 0
        timeout = self._timeout(self.gw.config.first_chunk_timeout_s)
        headers = self.ctx.upstream_headers(self.attempt - 1, replica)
        self.upstream = await open_stream(
            self.gw.client,
            f"{replica.url}{path}",
            self.ctx.body_for(replica, body),
            headers,
            timeout,
        )
        if self.state.continuing:
            return []
        data = await self.upstream.next_event(timeout)
        if data is None:
            raise UpstreamError("the stream ended before its first event")
        return self._on_event(data)

    async def _detach(self, outcome: Outcome) -> None:
        upstream, self.upstream = self.upstream, None
        replica, self.replica = self.replica, None
        if upstream is not None:
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await upstream.aclose()
        if replica is not None:
            held = self.gw.clock() - self.attempt_started
            self.gw.release(replica, outcome, held, self.ctx.route.request_id)

    # ---- the stream --------------------------------------------------------------------------

    async def body(self, first: list[bytes]) -> AsyncIterator[bytes]:
        try:
            for event in first:
                yield event
            while not self.state.done:
                for event in await self._next_events():
                    yield event
        finally:
            with anyio.CancelScope(shield=True):
                await self._close(ok=self.state.done)

    async def _next_events(self) -> list[bytes]:
        try:
            if self._past_deadline():
                return self._fail("the request's deadline passed", "timeout", 504)
            config = self.gw.config
            wait = (
                config.stall_timeout_s if self.events_this_attempt else config.first_chunk_timeout_s
            )
            data = await self.upstream.next_event(self._timeout(wait))
            if data is None:
                raise UpstreamError("the stream ended before [DONE]")
            events = self._on_event(data)
            if self._should_leave():
                events += await self._continue_elsewhere(_evicted(self.replica), Outcome.NEUTRAL)
            return events
        except UpstreamError as exc:
            if self._past_deadline():
                return self._fail("the request's deadline passed", "timeout", 504)
            if not exc.retryable:  # the request's own error: passed on, not migrated
                await self._detach(Outcome.NEUTRAL)
                return self._end_with(json.loads(exc.body), str(exc.status))
            return await self._continue_elsewhere(exc)

    async def _continue_elsewhere(
        self, exc: UpstreamError, outcome: Outcome = Outcome.FAILURE
    ) -> list[bytes]:
        try:
            return await self._migrate(exc, outcome)
        except Unrecoverable as why:
            self.gw.metrics.migration_failures.inc()
            return self._fail(str(why), "upstream_error", 502)

    def _should_leave(self) -> bool:
        """Whether to move off an evicted replica now (see the module docstring)."""
        replica = self.replica
        return (
            replica.evicting
            and not self.state.done
            and replica.supports_extensions
            and self.state.can_continue
            and self.migrations < self.gw.config.max_migrations
            and self.gw.any_accepting()
        )

    def _on_event(self, data: str) -> list[bytes]:
        self.events_this_attempt += 1
        self.replica.last_progress = self.gw.clock()
        had_token = self.state.token_sent
        events = self.state.on_event(data)
        if self.state.token_sent and not had_token:
            self.first_token_at = now = self.gw.clock()
            self.gw.metrics.ttft.observe(now - self.ctx.arrival)
            self.gw.recent_ttft.observe(now, now - self.ctx.arrival)
        if self.state.token_sent:
            self.gw.prefill_done(self.replica, self.ctx.route.request_id)
        return events

    def _timeout(self, wait: float) -> float:
        remaining = self.ctx.remaining(self.gw.clock())
        return wait if remaining is None else max(min(wait, remaining), 0.001)

    def _past_deadline(self) -> bool:
        remaining = self.ctx.remaining(self.gw.clock())
        return remaining is not None and remaining <= 0

    def _fail(self, message: str, err_type: str, code: int) -> list[bytes]:
        """End the stream with an error event (the status is 200 already)."""
        logger.warning("request %s: %s", self.ctx.request_id, message)
        return self._end_with(error_body(message, err_type, code=code), str(code))

    def _end_with(self, error: dict, status: str) -> list[bytes]:
        self.status = status
        self.state.done = True
        return [encode_event(error), DONE_EVENT]

    # ---- migration ---------------------------------------------------------------------------

    async def _migrate(self, exc: UpstreamError, outcome: Outcome = Outcome.FAILURE) -> list[bytes]:
        """Continue on another replica. Returns events to send now (none, usually: the new
        upstream's follow). Raises Unrecoverable. `outcome`: for the replica left."""
        failed = self.replica
        await self._detach(outcome)
        if failed is None:
            raise Unrecoverable(f"the stream broke: {exc}")
        self.ctx.exclude.add(failed.id)
        logger.log(
            logging.WARNING if outcome is Outcome.FAILURE else logging.INFO,
            "request %s: leaving replica %s mid-stream (%s)",
            self.ctx.request_id,
            failed.id,
            exc,
        )
        if not (failed.supports_extensions and self.state.can_continue):
            raise Unrecoverable(f"the stream broke and cannot be continued: {exc}")
        tokenizer = self.gw.prompts.tokenizer if self.gw.prompts is not None else None
        while True:
            if self.migrations >= self.gw.config.max_migrations:
                raise Unrecoverable(f"the stream broke {self.migrations + 1} times: {exc}")
            self.migrations += 1
            self.gw.metrics.migrations.labels(exc.reason).inc()
            body = self.state.continue_with(tokenizer)
            if isinstance(body, list):
                return body  # nothing left to generate
            try:
                request = self.ctx.route_request(needs_extensions=True)
                replica = await self.gw.route_now(request, self.ctx.deadline)
            except NoReplica as why:
                raise Unrecoverable(f"no replica to continue the stream on: {why}") from None
            sent = len(self.state.generated.get(0, ()))
            logger.info(
                "request %s: continuing on replica %s after %d tokens",
                self.ctx.request_id,
                replica.id,
                sent,
            )
            try:
                return await self._start(replica, "/v1/completions", body)
            except UpstreamError as again:
                await self._detach(Outcome.FAILURE if again.replica_failed else Outcome.NEUTRAL)
                self.ctx.exclude.add(replica.id)
                if not again.retryable:
                    raise Unrecoverable(f"the continuation was refused: {again}") from None
                exc = again
                await asyncio.sleep(self.gw.config.backoff(self.migrations))

    # ---- the end -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """End the session if nothing has yet (the client left before the body started)."""
        await self._close(ok=False)

    async def _close(self, ok: bool, status: str | None = None) -> None:
        """`ok`: the stream reached its end; otherwise the client left (or, with `status`,
        the stream never started). Runs once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if status is not None:
            self.status = status
        elif not ok:
            self.status = "499"
            self.gw.metrics.disconnects.inc()
            logger.info(
                "request %s: client left; closing its upstream request", self.ctx.request_id
            )
        if self.replica is not None:
            await self._detach(Outcome.SUCCESS if ok else Outcome.NEUTRAL)
        now = self.gw.clock()
        tokens = max((len(g) for g in self.state.generated.values()), default=0)
        if ok and self.first_token_at is not None and tokens > 1:
            self.gw.recent_itl.observe(now, (now - self.first_token_at) / (tokens - 1))
        if status is not None and self.ctx.handed_over:
            return  # a peer region may serve it: its failover ends the accounting
        used = None
        if status is not None:
            used = 0  # the stream never started: the client received nothing
        elif self.state.prompt_ids is not None:
            used = len(self.state.prompt_ids) + sum(len(g) for g in self.state.generated.values())
        self.gw.account(self.ctx, self.status, used)


def _evicted(replica: Replica) -> UpstreamError:
    exc = UpstreamError(f"replica {replica.id} is scaled down past its drain deadline")
    exc.reason = "drain"  # the migrations metric's label
    return exc


def local_failure(exc: BaseException) -> Exception | None:
    """`exc` if another region might serve what the local replicas did not: none accepted
    work, or they failed (not the request's own error, not a deadline, not load shedding)."""
    if isinstance(exc, NoReplica):
        return exc
    if isinstance(exc, UpstreamError) and exc.replica_failed:
        return exc
    return None


def failure_status(exc: BaseException) -> str:
    """The HTTP status of a request that failed before its first byte (for metrics)."""
    if isinstance(exc, Shed):
        return "429"
    if isinstance(exc, NoReplica):
        return "503"
    if isinstance(exc, DeadlineExceeded):
        return "504"
    if isinstance(exc, UpstreamError):
        if exc.busy:
            return "429"
        return str(exc.status) if exc.status and not exc.retryable else "502"
    return "499"
