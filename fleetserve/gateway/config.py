"""Gateway settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fleetserve.gateway.circuit_breaker import BreakerConfig


@dataclass(frozen=True)
class GatewayConfig:
    router: str = "prefix_aware"
    seed: int = 0
    # Failures before the first byte: retries on other replicas, with exponential backoff.
    max_retries: int = 3
    retry_backoff_s: float = 0.05
    retry_backoff_max_s: float = 1.0
    # Failures after it: continuations on other replicas, at most this many per request.
    max_migrations: int = 3
    connect_timeout_s: float = 5.0
    first_chunk_timeout_s: float = 120.0  # queueing + prefill on the replica
    stall_timeout_s: float = 30.0  # silence between two chunks of a stream
    unary_timeout_s: float = 600.0  # a whole non-streamed answer
    # How long a retry or migration waits for some replica to accept work (all may be
    # restarting) before the request fails.
    replica_wait_s: float = 30.0
    default_request_timeout_s: float | None = None  # deadline without X-Request-Timeout
    max_outstanding_per_replica: int = 64
    max_queue: int = 1024
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 10.0
    breaker_failure_threshold: int = 3
    breaker_cooldown_s: float = 2.0
    breaker_max_cooldown_s: float = 30.0
    default_max_tokens: int = 256  # for token-budget estimates when a request sets none
    # The door: bodies larger than this are refused with 413 before they are parsed.
    max_body_bytes: int = 4 * 1024 * 1024
    # Work one request may ask for, refused with 400: prompts in one /v1/completions batch,
    # choices per prompt (`n`, the replica's own cap too), and prompts x n (each choice
    # is a sequence the replica decodes). The replica's defaults: refused here, they cost
    # neither a replica round trip nor a tokenization.
    max_prompts_per_request: int = 256
    max_n: int = 128
    max_choices_per_request: int = 256
    # Envoy's retry budget: retries in flight at most this percentage of the requests in
    # flight, but `retry_min_concurrency` are always allowed.
    retry_budget_percent: float = 20.0
    retry_min_concurrency: int = 3
    # Send the key class's priority to the replicas named on the command line (they must run
    # with --allow-client-priority, or they answer 400); the gateway's own queue orders by
    # it either way. `fleetserve serve --replicas` turns it on for the replicas it starts.
    forward_priority: bool = False

    def __post_init__(self) -> None:
        from fleetserve.gateway.policies import POLICIES

        if self.router not in POLICIES:
            raise ValueError(f"router: unknown {self.router!r}; choose from {sorted(POLICIES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
        if self.max_outstanding_per_replica < 1:
            raise ValueError("max_outstanding_per_replica must be >= 1")
        if self.stall_timeout_s <= 0 or self.first_chunk_timeout_s <= 0:
            raise ValueError("stall_timeout_s and first_chunk_timeout_s must be > 0")
        for name in (
            "max_body_bytes",
            "max_prompts_per_request",
            "max_n",
            "max_choices_per_request",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retry_budget_percent > 100:
            raise ValueError(
                f"retry_budget_percent must be within 0..100, got {self.retry_budget_percent}"
            )
        _ = self.breaker  # validates the breaker fields

    @property
    def breaker(self) -> BreakerConfig:
        return BreakerConfig(
            failure_threshold=self.breaker_failure_threshold,
            cooldown_s=self.breaker_cooldown_s,
            max_cooldown_s=max(self.breaker_max_cooldown_s, self.breaker_cooldown_s),
        )

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based)."""
        return min(self.retry_backoff_s * 2 ** (attempt - 1), self.retry_backoff_max_s)
