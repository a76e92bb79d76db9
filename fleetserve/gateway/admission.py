"""Per-key admission: requests/s and tokens/min token buckets and a concurrency cap.

Pure: `now` is passed in. A refused request gets a reason and a Retry-After in seconds.
The tokens/min bucket is charged what a request may cost on admission (its prompt tokens
plus max_tokens for each of its prompts x n sequences, see `request_body.charged_tokens`)
and the unused part is given back when the request ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetserve.gateway.api_keys import ApiKey
from fleetserve.gateway.token_bucket import TokenBucket


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: str = ""  # "requests_per_s" | "tokens_per_min" | "max_concurrent" | ...
    retry_after_s: float = 0.0


ADMITTED = Decision(True)


class _KeyState:
    def __init__(self, key: ApiKey, now: float) -> None:
        lim = key.limits
        self.requests = (
            TokenBucket(lim.requests_per_s, max(lim.requests_per_s, 1.0), now)
            if lim.requests_per_s
            else None
        )
        self.tokens = (
            TokenBucket(lim.tokens_per_min / 60.0, lim.tokens_per_min, now)
            if lim.tokens_per_min
            else None
        )
        self.concurrent = 0


class AdmissionController:
    """Limits per API key name. A limit that can never be met (a request whose token cost
    exceeds the bucket) is refused with reason `too_large` and no Retry-After."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key: ApiKey, now: float) -> _KeyState:
        state = self._keys.get(key.name)
        if state is None:
            state = self._keys[key.name] = _KeyState(key, now)
        return state

    def admit(self, key: ApiKey, cost_tokens: int, now: float) -> Decision:
        """Check every limit; take from the buckets only if all pass."""
        state = self._state(key, now)
        lim = key.limits
        if lim.max_concurrent is not None and state.concurrent >= lim.max_concurrent:
            return Decision(False, "max_concurrent", 1.0)
        if state.requests is not None and state.requests.available(now) < 1:
            return Decision(False, "requests_per_s", state.requests.try_take(1, now))
        if state.tokens is not None:
            wait = state.tokens.try_take(cost_tokens, now)
            if math.isinf(wait):
                return Decision(False, "too_large", 0.0)
            if wait > 0:
                return Decision(False, "tokens_per_min", wait)
        if state.requests is not None:
            state.requests.try_take(1, now)
        state.concurrent += 1
        return ADMITTED

    def charge_more(self, key: ApiKey, cost_tokens: int, now: float) -> Decision:
        """Take `cost_tokens` more for an admitted request whose cost was underestimated;
        takes nothing when refused (the caller then ends the request with `release`)."""
        state = self._state(key, now)
        if state.tokens is None:
            return ADMITTED
        wait = state.tokens.try_take(cost_tokens, now)
        if math.isinf(wait):
            return Decision(False, "too_large", 0.0)
        if wait > 0:
            return Decision(False, "tokens_per_min", wait)
        return ADMITTED

    def release(
        self, key: ApiKey, charged_tokens: int, used_tokens: int | None, now: float
    ) -> None:
        """The request ended; `used_tokens` None means unknown (nothing is given back). A
        request that used more than its charge (a chat without max_tokens runs to the
        context; an estimated prompt was longer) owes the rest: the key's bucket goes into
        debt, and its next requests wait until the refill has paid it."""
        state = self._state(key, now)
        state.concurrent = max(state.concurrent - 1, 0)
        if state.tokens is not None and used_tokens is not None:
            if used_tokens > charged_tokens:
                state.tokens.take_debt(used_tokens - charged_tokens, now)
            else:
                state.tokens.give_back(charged_tokens - used_tokens, now)

    def concurrent(self, key: ApiKey) -> int:
        state = self._keys.get(key.name)
        return state.concurrent if state else 0
