"""Everything the gateway decided about one client request before sending it anywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fleetserve.gateway.api_keys import ApiKey
from fleetserve.gateway.route_request import RouteRequest


@dataclass
class RequestContext:
    endpoint: str  # the path, e.g. "/v1/chat/completions"
    chat: bool
    body: dict
    request_id: str
    key: ApiKey
    route: RouteRequest
    arrival: float
    deadline: float | None
    charged_tokens: int  # taken from the key's tokens/min bucket
    exclude: set[str] = dataclasses.field(default_factory=set)

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

    def upstream_headers(self, attempt: int) -> dict[str, str]:
        rid = self.request_id if attempt == 0 else f"{self.request_id}.{attempt}"
        return {"X-Request-Id": rid}
