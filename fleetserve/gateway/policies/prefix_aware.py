"""Prefix-aware routing: send a prompt where most of it is already in the KV cache, unless
the work queued there costs more than recomputing the prompt elsewhere.

Each replica's cached blocks are known exactly (mirrored from its KV events, see
`PrefixIndex`), so `cached(r)` is the number of prompt tokens replica r will really skip.
The score estimates the prefill work a request waits for before its first token, in
prompt tokens (lower wins):

    cost(r) = (prompt_tokens - cached(r))          # its own prefill there
            + pending_prefill(r)                   # prompts routed there, not yet prefilled
            + decode_cost_tokens * outstanding(r)  # every request in flight slows each step

`pending_prefill(r)` is the gateway's own ledger: the uncached prompt tokens of requests it
sent to r that have not produced a token yet. `decode_cost_tokens` (default 16) prices a
request already decoding as that many prompt tokens of extra work for a newcomer. A replica
more than `max_imbalance` requests above the least loaded one is skipped outright,
whatever its cache. Ties go to the less loaded replica, then in turn. With no prefix
information (no tokenizer at the gateway, or replicas that publish no KV events) this
routes by queued work alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetserve.gateway.policies.base import RoutingPolicy, TieBreaker
from fleetserve.gateway.replica import ReplicaView
from fleetserve.gateway.route_request import RouteRequest


class PrefixAware(RoutingPolicy):
    name = "prefix_aware"

    def __init__(self, decode_cost_tokens: float = 16.0, max_imbalance: int = 16) -> None:
        if decode_cost_tokens < 0 or max_imbalance < 0:
            raise ValueError("decode_cost_tokens and max_imbalance must be >= 0")
        self.decode_cost_tokens = decode_cost_tokens
        self.max_imbalance = max_imbalance
        self._ties = TieBreaker()

    def cost(self, request: RouteRequest, replica: ReplicaView) -> float:
        return (
            request.uncached_tokens(replica.prefix)
            + replica.pending_prefill_tokens
            + self.decode_cost_tokens * replica.outstanding
        )

    def choose(
        self, request: RouteRequest, replicas: Sequence[ReplicaView], now: float
    ) -> ReplicaView:
        least = min(r.outstanding for r in replicas)
        fair = [r for r in replicas if r.outstanding <= least + self.max_imbalance]
        costs = {r.id: (self.cost(request, r), r.outstanding) for r in fair}
        best = min(costs.values())
        return self._ties.pick([r for r in fair if costs[r.id] == best])
