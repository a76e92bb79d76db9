"""Everything the gateway decided about one client request before sending it anywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fleetserve.gateway.api_keys import ApiKey
from fleetserve.gateway.priority import DEFAULT_PRIORITY, priority_rank
from fleetserve.gateway.replica import Replica
from fleetserve.gateway.route_request import RouteRequest


@dataclass(frozen=True)
class RawRequest:
    """A request forwarded as it came (a tensor model's `/predict` or KServe v2 call): the
    replica path to call and the body bytes with the headers that describe them."""

    method: str
    path: str
    content: bytes
    headers: dict[str, str]


@dataclass
class RequestContext:
    endpoint: str  # the path, e.g. "/v1/chat/completions" (a route template for raw ones)
    chat: bool
    body: dict
    request_id: str
    key: ApiKey
    route: RouteRequest
    arrival: float
    deadline: float | None
    charged_tokens: int  # taken from the key's tokens/min bucket
    exclude: set[str] = dataclasses.field(default_factory=set)
    retry_in_flight: bool = False  # holds a place in the gateway's retry budget
    raw: RawRequest | None = None  # forwarded as it is, not as an OpenAI JSON body
    spilled_from: str | None = None  # the peer region that sent it here (served here)
    # Why the local replicas could not serve it before its first byte (a peer may, then).
    local_failure: Exception | None = None
    # A peer region would take it after such a failure: the local attempt then leaves the
    # key's admission and the request's metrics to whoever ends it (the failover or the
    # caller), so that it is admitted and counted once.
    may_fail_over: bool = False

    @property
    def handed_over(self) -> bool:
        """The local attempt failed in a way a peer region may mend (see `may_fail_over`)."""
        return self.may_fail_over and self.local_failure is not None

    def __post_init__(self) -> None:
        # The priority is the key's, never the client's (see `body_for`).
        self.body.pop("priority", None)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def wants_token_ids(self) -> bool:
        return bool(self.body.get("return_token_ids"))

    def route_request(self, needs_extensions: bool = False) -> RouteRequest:
        """The routing request for another attempt, excluding replicas that failed."""
        return dataclasses.replace(
            self.route, exclude=frozenset(self.exclude), needs_extensions=needs_extensions
        )

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    def upstream_headers(self, attempt: int, replica: Replica) -> dict[str, str]:
        rid = self.request_id if attempt == 0 else f"{self.request_id}.{attempt}"
        return {**replica.auth_headers, "X-Request-Id": rid}

    def body_for(self, replica: Replica, body: dict | None = None) -> dict:
        """`body` (default: the client's) as sent to `replica`, with the key's priority
        and never the client's: a fleetserve replica gets the key's class relative to the
        default one (critical -2, high -1, low 1; lower is served first, as the replica
        orders them), left out for the default class (the replica's own default, 0);
        other servers, and replicas that do not take a priority, get none."""
        out = dict(self.body if body is None else body)
        out.pop("priority", None)
        relative = self.key.priority_rank - priority_rank(DEFAULT_PRIORITY)
        if replica.supports_extensions and replica.accepts_priority and relative:
            out["priority"] = relative
        return out
