"""A replica as the gateway sees it: mutable `Replica` state owned by the gateway, and the
frozen `ReplicaView` snapshots that routing policies read."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fleetserve.gateway.circuit_breaker import BreakerConfig, BreakerState, CircuitBreaker
from fleetserve.gateway.prefix_index import EMPTY_PREFIX, PrefixIndex, PrefixView


class ReplicaKind(enum.Enum):
    FLEETSERVE = "fleetserve"  # speaks our extensions: token ids, KV events, metrics
    OPENAI = "openai"  # any OpenAI-compatible server: no migration, no prefix index


@dataclass
class LoadStats:
    """Scraped from the replica's /metrics (fleetserve replicas only)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    refused: bool = False  # the replica answered 401/403: the gateway's key is not its operator's

    def __setattr__(self, name: str, value: object) -> None:
        state = self.__dict__
        if name in state and state[name] == value:
            return  # unchanged: the replica's view stays valid
        object.__setattr__(self, name, value)
        owner = state.get("_owner")
        if owner is not None:
            owner._changed()


class _Ledger(dict):
    """`Replica.prefilling`: a dict that tells its replica when it changes."""

    __slots__ = ("_owner",)

    def __init__(self, owner: Replica, items: dict) -> None:
        super().__init__(items)
        self._owner = owner

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._owner._changed()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._owner._changed()

    def pop(self, *args):
        value = super().pop(*args)
        self._owner._changed()
        return value

    def popitem(self):
        item = super().popitem()
        self._owner._changed()
        return item

    def setdefault(self, key, default=None):
        value = super().setdefault(key, default)
        self._owner._changed()
        return value

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._owner._changed()

    def clear(self) -> None:
        super().clear()
        self._owner._changed()


@dataclass
class Replica:
    id: str
    url: str
    kind: ReplicaKind = ReplicaKind.FLEETSERVE
    pid: int | None = None
    breaker_config: BreakerConfig = field(default_factory=BreakerConfig)
    # ready: the last active probe passed (a new replica is not ready until one does).
    ready: bool = False
    draining: bool = False
    # Draining past its deadline: its streams continue on other replicas at their next event.
    evicting: bool = False
    down: bool = False  # its process is known to be gone (supervisor)
    # Started by the supervisor and no probe has passed since (set with `started_at`).
    loading: bool = False
    started_at: float | None = None  # gateway clock, when its process was started
    failed: str | None = None  # why its supervisor gave up restarting it (a crash loop)
    outstanding: int = 0  # requests this gateway has in flight on it
    # request id -> prompt tokens it still has to prefill here (estimated when routed),
    # for requests that have not produced a token yet
    prefilling: dict[str, int] = field(default_factory=dict)
    load: LoadStats = field(default_factory=LoadStats)
    model_ids: list[str] = field(default_factory=list)
    last_progress: float = float("-inf")  # when this gateway last received a chunk from it
    # Sent on every call to this replica: its bearer key, if it needs one. Per replica, so
    # that the fleet's internal key goes only to replicas the operator named or started.
    auth_headers: dict[str, str] = field(default_factory=dict, repr=False)
    # Gets the `priority` of the client's key class: only a replica that honours it (one
    # the fleet started with --allow-client-priority, or `forward_priority` in the config).
    accepts_priority: bool = False

    def __post_init__(self) -> None:
        self.url = check_replica_url(self.url)
        self.breaker = CircuitBreaker(self.breaker_config)
        self.prefix = PrefixIndex()

    # ---- change notification: the dispatcher caches one view per replica and rebuilds
    # only those whose state changed (see `Dispatcher.views`). Every field set, a change of
    # `load`'s fields, of `prefilling` and of the breaker's state calls `on_change(id)`.

    def __setattr__(self, name: str, value: object) -> None:
        if name == "prefilling" and not isinstance(value, _Ledger):
            value = _Ledger(self, value)
        elif name == "load":
            object.__setattr__(value, "_owner", self)
        elif name == "breaker":
            value.on_change = self._changed
        object.__setattr__(self, name, value)
        if name in _VIEW_FIELDS:
            listener = self.__dict__.get("on_change")
            if listener is not None:
                listener(self.id)

    def _changed(self) -> None:
        listener = self.__dict__.get("on_change")
        if listener is not None:
            listener(self.id)

    @property
    def state(self) -> str:
        """One word for people: failed, loading, down, draining, ready or not_ready."""
        if self.failed is not None:
            return "failed"
        if self.loading:
            return "loading"
        if self.down:
            return "down"
        if self.draining:
            return "draining"
        return "ready" if self.ready else "not_ready"

    @property
    def supports_extensions(self) -> bool:
        return self.kind is ReplicaKind.FLEETSERVE

    def busy_recently(self, now: float, window_s: float) -> bool:
        return now - self.last_progress < window_s

    def healthy(self, now: float) -> bool:
        return self.ready and not self.down and self.breaker.state(now) is not BreakerState.OPEN

    def view(self, now: float) -> ReplicaView:
        return ReplicaView(
            id=self.id,
            url=self.url,
            kind=self.kind,
            outstanding=self.outstanding,
            running=self.load.running,
            waiting=self.load.waiting,
            kv_cache_usage=self.load.kv_cache_usage,
            healthy=self.healthy(now),
            accepting=self.ready
            and not self.down
            and not self.draining
            and self.breaker.allows(now),
            draining=self.draining,
            breaker_state=self.breaker.state(now),
            prefix=PrefixView(self.prefix) if self.supports_extensions else EMPTY_PREFIX,
            pending_prefill_tokens=sum(self.prefilling.values()),
        )


# The fields `view` reads (besides `load`, `prefilling` and the breaker's state, which
# announce their own changes): setting any other field leaves the view as it was.
_VIEW_FIELDS = frozenset(
    {"id", "url", "kind", "outstanding", "ready", "down", "draining", "load", "prefilling"}
    | {"breaker", "prefix"}
)


def check_replica_url(url: str) -> str:
    """`url` without a trailing slash; raises ValueError unless it is a plain http(s) base
    URL (a host, no credentials, no query or fragment)."""
    if not isinstance(url, str):
        raise ValueError(f"a replica URL must be a string, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"replica URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"replica URL {url!r} must be http(s)://HOST[:PORT][/PATH]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"replica URL for {parts.hostname} must not hold credentials; pass its key "
            "as 'api_key' instead"
        )
    if parts.query or parts.fragment or any(c.isspace() for c in url):
        raise ValueError(f"replica URL {url!r} must have no query, fragment or spaces")
    return url.rstrip("/")


@dataclass(frozen=True)
class ReplicaView:
    id: str
    url: str
    kind: ReplicaKind
    outstanding: int
    running: int
    waiting: int
    kv_cache_usage: float
    healthy: bool
    accepting: bool  # healthy, not draining, and the breaker lets a request through now
    draining: bool
    breaker_state: BreakerState
    prefix: PrefixView
    pending_prefill_tokens: int = 0  # prompt tokens routed here and not yet prefilled
