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
        # `cost` for every replica within `max_imbalance` of the least loaded, in one pass
        # (a fleet of 1,000 replicas pays this per request): the same sums as `cost`, in
        # the same order, so the same choice.
        least = min(r.outstanding for r in replicas)
        limit = least + self.max_imbalance
        decode = self.decode_cost_tokens
        prompt = request.num_prompt_tokens
        known = request.prompt_token_ids is not None
        hashes: dict[int, list[int]] = {}
        best: tuple[float, int] | None = None
        tied: list[ReplicaView] = []
        for r in replicas:
            outstanding = r.outstanding
            if outstanding > limit:
                continue
            prefix = r.prefix
            block_size = prefix.block_size
            if block_size and known:
                chain = hashes.get(block_size)
                if chain is None:
                    chain = hashes[block_size] = request.block_hashes(block_size)
                uncached = max(prompt - prefix.match_prefix(chain) * block_size, 0)
            else:
                uncached = max(prompt, 0)
            key = (uncached + r.pending_prefill_tokens + decode * outstanding, outstanding)
            if best is None or key < best:
                best, tied = key, [r]
            elif key == best:
                tied.append(r)
        return self._ties.pick(tied)
