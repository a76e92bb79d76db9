"""Limits at the HTTP door, below the app: head size, head and body read deadlines, open
connections, keep-alive. One place, so that the replica and the gateway apply the same rules.

uvicorn alone bounds neither how long a client may take to send its request head (a socket
that sends half a header and stalls is held forever) nor, with httptools, the head's size. So
the server runs h11 (whose parser refuses a head over `max_header_bytes`) through
`LimitedH11Protocol`, which adds the two deadlines:

    connect / idle keep-alive ends    head complete              body complete
    |------- header_timeout -------->|------- body_timeout ----->|  (then the app's time)

A head that misses its deadline gets a 408 and the connection closes; a body that misses its
deadline gets a 408 if the app has not answered yet, and the connection closes. An oversized
head gets 431. Apply it with `uvicorn.Config(app, **limits.uvicorn_kwargs(), ...)`.
This module imports neither torch nor the app.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import re
from dataclasses import dataclass, fields
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

logger = logging.getLogger(__name__)

_HEAD_END = re.compile(rb"\r?\n\r?\n")  # h11 also takes bare newlines


@dataclass(frozen=True)
class HttpLimits:
    # 32 KiB holds long bearer tokens and cookies (nginx reads 4 x 8 KiB, Node 16 KiB).
    max_header_bytes: int = 32 * 1024
    header_timeout: float = 10.0  # seconds from connect (or the first byte after idle) to head
    # seconds for the whole body once the head is in: 4 MiB at ~0.6 Mbit/s; a client that
    # trickles a byte now and then cannot hold the connection longer than this
    body_timeout: float = 60.0
    # open connections (streams included) beyond which new requests get 503; uvicorn counts
    # connections and request tasks
    max_connections: int = 2048
    keep_alive_timeout: float = 30.0  # idle seconds before a kept-alive connection closes

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> HttpLimits:
        """The limits among resolved CLI/config options named like the fields."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `uvicorn.Config` that apply these limits."""
        return {
            "http": functools.partial(LimitedH11Protocol, limits=self),
            "h11_max_incomplete_event_size": self.max_header_bytes,
            "limit_concurrency": self.max_connections,
            "timeout_keep_alive": self.keep_alive_timeout,
        }


# The limits as options of `fleetserve serve` and `fleetserve gateway`: name -> (type,
# default, help), the same shape as `fleetserve.server.cli.SERVER_OPTIONS`.
HTTP_LIMIT_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "max_header_bytes": (
        int,
        HttpLimits.max_header_bytes,
        "largest request head (line and headers; else 431)",
    ),
    "header_timeout": (
        float,
        HttpLimits.header_timeout,
        "seconds a client has to send a request head, from connect or its first byte (else "
        "408 and close)",
    ),
    "body_timeout": (
        float,
        HttpLimits.body_timeout,
        "seconds a client has to send a whole request body",
    ),
    "max_connections": (
        int,
        HttpLimits.max_connections,
        "open connections beyond which new requests get 503",
    ),
    "keep_alive_timeout": (
        float,
        HttpLimits.keep_alive_timeout,
        "seconds an idle kept-alive connection stays open",
    ),
}
assert set(HTTP_LIMIT_OPTIONS) == {f.name for f in fields(HttpLimits)}


def add_http_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The limits as flags (`HttpLimits.from_options(vars(args))` reads them back)."""
    group = parser.add_argument_group("HTTP limits")
    for name, (kind, default, text) in HTTP_LIMIT_OPTIONS.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{text} (default: {default})",
        )


class _Connection(h11.Connection):
    """Remembers the status h11 suggests for the last malformed request (431 for a head
    over the size limit), which uvicorn otherwise always answers with 400."""

    error_status = 400

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status = exc.error_status_hint
            raise


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head and one for the body.

    At most one timer runs per connection: `_phase` says what it waits for ("head", "body"
    or None while the app works or the connection idles under uvicorn's keep-alive timer)."""

    def __init__(self, *args: Any, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.conn = _Connection(h11.SERVER, limits.max_header_bytes)
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._served_one = False  # after a response, idling is keep-alive's business

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            # h11 bounds only a head still incomplete; one that arrives whole in a chunk
            # would pass.
            self._set_phase(None)
            return self._send_raw(431, self._too_large_message())
        super().data_received(data)
        self._watch()

    def _head_too_large(self, data: bytes) -> bool:
        head = self.conn.trailing_data[0] + data
        end = _HEAD_END.search(head)
        return (end.end() if end else len(head)) > self.limits.max_header_bytes

    def _too_large_message(self) -> str:
        return f"Request header fields are larger than {self.limits.max_header_bytes} bytes."

    def on_response_complete(self) -> None:
        self._served_one = True
        super().on_response_complete()
        self._watch()

    def send_400_response(self, msg: str) -> None:
        self._set_phase(None)
        status = self.conn.error_status
        self._send_error(status, self._too_large_message() if status == 431 else msg)

    # ---- deadlines ---------------------------------------------------------------------------

    def _watch(self) -> None:
        """Arm the timer for what the connection now waits for from the client."""
        if self.transport is None or self.transport.is_closing():
            return self._set_phase(None)
        state = self.conn.their_state
        if state is h11.IDLE:
            # A fresh connection, or bytes of a next request already buffered: a head is due.
            head_started = not self._served_one or bool(self.conn.trailing_data[0])
            self._set_phase("head" if head_started else None)
        elif state is h11.SEND_BODY:
            self._set_phase("body")
        else:
            self._set_phase(None)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            timeout = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
            self._timer = self.loop.call_later(timeout, self._expire, phase)

    def _expire(self, phase: str) -> None:
        self._timer = None
        if phase != self._phase or self.transport.is_closing():
            return
        self._phase = None
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if phase == "head":
            logger.debug(  # debug: a flood of slow sockets must not flood the log
                "closing %s: no complete request head within %.0f s",
                client,
                self.limits.header_timeout,
            )
            return self._send_raw(408, "Request head not received in time.")
        logger.debug(
            "closing %s: request body not received within %.0f s", client, self.limits.body_timeout
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app now reads a disconnect, and its sends are dropped
            cycle.message_event.set()
            self._send_error(408, "Request body not received in time.")
        else:
            self.transport.close()

    def _send_raw(self, status: int, msg: str) -> None:
        """Answer and close where h11 cannot: it sends no response to a head it has not
        parsed."""
        body = msg.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, STATUS_PHRASES[status], len(body), body)
        )
        self.transport.close()

    def _send_error(self, status: int, msg: str) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                h11.Data(data=msg.encode()),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a state in which no response can be sent: just close
            pass
        self.transport.close()
