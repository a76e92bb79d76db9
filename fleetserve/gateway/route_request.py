"""What a routing policy knows about one request."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetserve.engine.block_hash import hash_block_chain
from fleetserve.gateway.prefix_index import PrefixView


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    # The prompt as the replica will tokenize it, when the gateway has a tokenizer; None
    # when unknown (no tokenizer, or a batch of prompts).
    prompt_token_ids: tuple[int, ...] | None = None
    num_prompt_tokens: int = 0  # exact when prompt_token_ids is given, else an estimate
    max_tokens: int = 0
    priority_rank: int = 2
    exclude: frozenset[str] = frozenset()  # replica ids that already failed this request
    needs_extensions: bool = False  # only fleetserve replicas can take it (a continuation)
    _hashes: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    def block_hashes(self, block_size: int) -> list[int]:
        """Hash chain of the prompt's full blocks (memoized per block size; empty when the
        prompt is unknown)."""
        if self.prompt_token_ids is None:
            return []
        hashes = self._hashes.get(block_size)
        if hashes is None:
            hashes = self._hashes[block_size] = hash_block_chain(self.prompt_token_ids, block_size)
        return hashes

    def cached_tokens(self, prefix: PrefixView) -> int:
        """Prompt tokens a replica with this prefix cache would not recompute."""
        if not prefix.block_size or self.prompt_token_ids is None:
            return 0
        return prefix.match_prefix(self.block_hashes(prefix.block_size)) * prefix.block_size

    def uncached_tokens(self, prefix: PrefixView) -> int:
        return max(self.num_prompt_tokens - self.cached_tokens(prefix), 0)
