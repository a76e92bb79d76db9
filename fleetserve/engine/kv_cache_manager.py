"""Paged KV-cache bookkeeping with a prefix cache. Pure Python: block ids only, no tensors.

A request owns a block table: ``blocks[i]`` holds the K/V of token positions
``[i * block_size, (i + 1) * block_size)``. A block whose tokens are all known is *full*;
full blocks are keyed by a hash chain (see `block_hash`) and registered in the prefix cache,
so another request with the same prefix reuses them. A block nobody references goes to the
free queue but keeps its cache entry until it is reused for something else (LRU eviction).

    block table of a request (block_size 4, 10 tokens known, 9 computed):

      [b7: t0..t3 full, cached] [b2: t4..t7 full, cached] [b9: t8 t9 _ _ partial]
                                                                  ^ t9 known, not computed
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from fleetserve.engine.block_hash import NONE_HASH, hash_block_chain
from fleetserve.engine.request import Request

NULL_BLOCK_ID = 0  # reserved, never allocated: padding entries of block tables point here


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens behind block_hash, to verify hits


@dataclass(frozen=True)
class KVEvent:
    """What a router needs to mirror this cache: blocks stored (in chain order, each with
    its parent) or removed. `token_ids` lets a consumer check a hash without trusting it."""

    kind: str  # "stored" | "removed" | "cleared"
    block_hashes: tuple[int, ...] = ()
    parent_hash: int = NONE_HASH
    token_ids: tuple[tuple[int, ...], ...] = ()


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class KVCacheManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    record_events: bool = True
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is reserved), got {self.num_blocks}")
        # The pool is lazy: a block object exists once it is first handed out (or looked
        # at through `blocks`). Ids >= `_next_fresh` were never allocated; they lead the
        # free queue in id order, since every freed block joins behind them. So a cache of
        # thousands of blocks costs nothing to build (a simulated fleet builds 1,000).
        self._pool: list[Block] = [Block(NULL_BLOCK_ID, ref_cnt=1)]  # never freed, never allocated
        self._next_fresh = 1
        # Unreferenced blocks that were used once, least recently used first. Cached ones
        # stay findable here.
        self._free: OrderedDict[int, Block] = OrderedDict()
        self.cached: dict[int, Block] = {}
        self.req_blocks: dict[str, list[Block]] = {}
        self._req_ids: dict[str, list[int]] = {}  # req_blocks as ids (a table every step)
        self.req_num_cached: dict[str, int] = {}  # leading blocks already registered
        self.events: list[KVEvent] = []

    # ---- queries (no side effects) -------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self.num_blocks - self._next_fresh

    @property
    def free_queue(self) -> list[int]:
        """Ids of the free blocks in the order they will be taken (never-used ones first,
        then the least recently freed). Builds a list: for tests and debugging."""
        return [*range(self._next_fresh, self.num_blocks), *self._free]

    @property
    def blocks(self) -> list[Block]:
        """Every block, by id (materializes the whole pool: for tests and debugging)."""
        self._materialize(self.num_blocks)
        return self._pool

    def _materialize(self, end: int) -> None:
        pool = self._pool
        pool.extend(Block(i) for i in range(len(pool), end))

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def block_ids(self, request_id: str) -> list[int]:
        ids = self._req_ids.get(request_id)
        return [] if ids is None else ids.copy()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------------------------

    def _update_hashes(self, request: Request) -> None:
        if (
            self.enable_prefix_caching
            and len(request.all_token_ids) >= (len(request.block_hashes) + 1) * self.block_size
        ):  # (a block was filled since: hashing copies the chain, so not on every step)
            request.block_hashes = hash_block_chain(
                request.all_token_ids,
                self.block_size,
                request.extra_hash_keys,
                request.block_hashes,
            )

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest run of cached blocks that starts the request's tokens, and how many tokens
        they cover. At least one token is always left to compute, since its logits are needed.
        Counts one query; does not take references (see `allocate_slots`)."""
        if not self.enable_prefix_caching:
            return [], 0
        self._update_hashes(request)
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0  # as in vLLM: a cached position has no logits to give logprobs from
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.cached.get(block_hash)
            tokens = tuple(request.all_token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block is None or block.token_ids != tokens:  # verify: a hash is not proof
                break
            hits.append(block)
        self.stats.queries += request.num_tokens
        self.stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ---- allocation ------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[Block] = ()
    ) -> bool:
        """Make room for `num_new_tokens` more tokens after `request.num_computed_tokens`
        (counted after `computed_blocks`, which a new request takes from the prefix cache).
        Returns False, changing nothing, when there are not enough free blocks. Full blocks
        among the tokens of this step are registered in the prefix cache: the attention
        backend writes all new K/V of a step before any attention reads it, so a request
        scheduled later in the same step may already reuse them."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks is not None and not computed_blocks:
            # A request that holds blocks (a decode or a later prefill chunk, every step):
            # its table grows in place, and nothing is registered until a block fills.
            total = request.num_computed_tokens + num_new_tokens
            num_new_blocks = -(-total // self.block_size) - len(blocks)
            if num_new_blocks > 0:
                if num_new_blocks > self.num_free_blocks:
                    return False
                new = [self._pop_free() for _ in range(num_new_blocks)]
                blocks.extend(new)
                self._req_ids[request.request_id].extend([b.block_id for b in new])
            if total // self.block_size > self.req_num_cached[request.request_id]:
                self._cache_full_blocks(request, total)
            return True
        blocks = blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(blocks) - len(computed_blocks)
        # Cached hits sitting in the free queue stop being free once we take them.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.num_free_blocks:
            return False
        for block in computed_blocks:
            self._touch(block)
        blocks = blocks + list(computed_blocks) + [self._pop_free() for _ in range(num_new_blocks)]
        self.req_blocks[request.request_id] = blocks
        self._req_ids[request.request_id] = [b.block_id for b in blocks]
        if not self.req_num_cached.get(request.request_id):
            self.req_num_cached[request.request_id] = len(computed_blocks)
        self._cache_full_blocks(request, total)
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        self._update_hashes(request)
        blocks = self.req_blocks[request.request_id]
        start = self.req_num_cached[request.request_id]
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        stored: list[int] = []  # indices of blocks registered now
        for i in range(start, end):
            block = blocks[i]
            block_hash = request.block_hashes[i]
            tokens = tuple(request.all_token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash, block.token_ids = block_hash, tokens
                self.cached[block_hash] = block
                stored.append(i)
        self.req_num_cached[request.request_id] = max(start, end)
        if self.record_events:
            # One event per run of consecutive blocks, so each block's parent is the one
            # before it in the event (or `parent_hash` for the first).
            for run in _consecutive_runs(stored):
                parent = request.block_hashes[run[0] - 1] if run[0] > 0 else NONE_HASH
                self.events.append(
                    KVEvent(
                        "stored",
                        tuple(blocks[i].block_hash for i in run),
                        parent,
                        tuple(blocks[i].token_ids for i in run),
                    )
                )

    def blocks_registered_for(self, request_id: str, start: int, end: int) -> list[Block]:
        """The request's blocks that `allocate_slots` registered in the prefix cache for
        positions [start, end), i.e. before a step computed them: the full blocks holding
        a position >= start. (Blocks before position `start` were computed by earlier steps
        or are prefix hits; they are not returned.)"""
        blocks = self.req_blocks.get(request_id, [])
        first, last = start // self.block_size, end // self.block_size
        return [b for b in blocks[first:last] if b.block_hash is not None]

    def uncache(self, blocks: list[Block]) -> None:
        """Withdraw blocks from the prefix cache, because the step that was to fill them did
        not. They stay in their request's block table; nobody else can find them now."""
        for block in blocks:
            if block.block_hash is None:
                continue
            del self.cached[block.block_hash]
            if self.record_events:
                self.events.append(KVEvent("removed", (block.block_hash,)))
            block.block_hash = block.token_ids = None

    def _touch(self, block: Block) -> None:
        if block.ref_cnt == 0:
            del self._free[block.block_id]
        block.ref_cnt += 1

    def _pop_free(self) -> Block:
        fresh = self._next_fresh
        if fresh < self.num_blocks:  # never used: no cache entry to evict
            self._next_fresh = fresh + 1
            pool = self._pool
            if fresh >= len(pool):
                self._materialize(fresh + 1)
            block = pool[fresh]
            block.ref_cnt = 1
            return block
        _, block = self._free.popitem(last=False)  # least recently used
        if block.block_hash is not None:  # evict its cache entry
            del self.cached[block.block_hash]
            if self.record_events:
                self.events.append(KVEvent("removed", (block.block_hash,)))
            block.block_hash = block.token_ids = None
        block.ref_cnt = 1
        return block

    def free(self, request: Request) -> None:
        """Release every block of the request; cached ones stay findable until evicted.
        Tail blocks go to the free queue first so that they are evicted before the shared
        heads of a prefix."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self._req_ids.pop(request.request_id, None)
        self.req_num_cached.pop(request.request_id, None)
        for block in reversed(blocks):
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Only possible when no request holds blocks."""
        if self.req_blocks:
            return False
        for block in self.cached.values():
            block.block_hash = block.token_ids = None
        self.cached.clear()
        if self.record_events:
            self.events.append(KVEvent("cleared"))
        return True

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events


def _consecutive_runs(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
