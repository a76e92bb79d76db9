"""KVCacheManager with hand-built requests: block tables, free queue, prefix cache, events."""

from __future__ import annotations

import pytest

from fleetserve.engine.block_hash import NONE_HASH, hash_block, hash_block_chain
from fleetserve.engine.kv_cache_manager import NULL_BLOCK_ID, KVCacheManager, KVEvent
from fleetserve.engine.request import Request
from fleetserve.engine.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, prompt, salt: str | None = None) -> Request:
    return Request(request_id, list(prompt), SamplingParams(cache_salt=salt))


def make_kv(num_blocks: int = 9, **kwargs) -> KVCacheManager:
    return KVCacheManager(num_blocks=num_blocks, block_size=BS, **kwargs)


def admit(kv: KVCacheManager, request: Request, num_new: int | None = None) -> int:
    """What the scheduler does for a waiting request; returns the cached token count."""
    blocks, num_cached = kv.get_computed_blocks(request)
    num_new = request.num_tokens - num_cached if num_new is None else num_new
    assert kv.allocate_slots(request, num_new, blocks)
    request.num_computed_tokens = num_cached + num_new
    return num_cached


def decode(kv: KVCacheManager, request: Request, token: int) -> None:
    """Append a sampled token and compute it (one decode step)."""
    request.append_output_token(token)
    assert kv.allocate_slots(request, 1)
    request.num_computed_tokens += 1


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert kv.req_blocks == {}
    assert [b.ref_cnt for b in kv.blocks] == [1] + [0] * kv.num_usable_blocks
    assert NULL_BLOCK_ID not in kv.free_queue


# ---- construction and the null block ------------------------------------------------------


def test_null_block_is_reserved_and_not_free():
    kv = make_kv(5)
    assert kv.num_usable_blocks == 4
    assert kv.num_free_blocks == 4
    assert list(kv.free_queue) == [1, 2, 3, 4]
    assert kv.usage == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_blocks": 1, "block_size": 4}, "num_blocks"),
        ({"num_blocks": 4, "block_size": 0}, "block_size"),
    ],
)
def test_invalid_sizes_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        KVCacheManager(**kwargs)


def test_null_block_is_never_allocated_even_when_the_cache_is_full():
    kv = make_kv(5)
    req = make_request("a", range(16))  # exactly the 4 usable blocks
    admit(kv, req)
    assert kv.block_ids("a") == [1, 2, 3, 4]
    assert kv.num_free_blocks == 0
    assert kv.usage == 1.0
    assert not kv.allocate_slots(make_request("b", [1]), 1)
    kv.free(req)
    assert_all_free(kv)


def test_blocks_needed():
    kv = make_kv()
    assert [kv.blocks_needed(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


# ---- allocation ---------------------------------------------------------------------------


def test_allocate_takes_blocks_in_free_queue_order():
    kv = make_kv()
    a, b = make_request("a", range(5)), make_request("b", range(100, 103))
    admit(kv, a)
    admit(kv, b)
    assert kv.block_ids("a") == [1, 2]
    assert kv.block_ids("b") == [3]
    assert kv.num_free_blocks == 5
    assert kv.block_ids("unknown") == []


def test_allocate_slots_short_of_blocks_returns_false_and_changes_nothing():
    kv = make_kv(4)  # 3 usable
    a = make_request("a", range(9))  # 3 blocks, the last one partial
    admit(kv, a)
    assert kv.num_free_blocks == 0
    kv.take_events()

    def state():
        return (
            kv.block_ids("a"),
            kv.num_free_blocks,
            dict(kv.cached),
            list(kv.free_queue),
            dict(kv.req_num_cached),
            [b.ref_cnt for b in kv.blocks],
        )

    before = state()
    b = make_request("b", [50])
    assert not kv.allocate_slots(b, 1)  # a new request
    assert "b" not in kv.req_blocks
    assert state() == before
    for token in (7, 8, 9):  # a fills its last block without a new one
        decode(kv, a, token)
    assert [e.kind for e in kv.take_events()] == ["stored"]
    before = state()
    a.append_output_token(10)  # position 12 needs a fourth block
    assert not kv.allocate_slots(a, 1)
    assert state() == before
    assert kv.take_events() == []


def test_allocate_short_of_blocks_counts_revived_cache_hits():
    kv = make_kv(4)  # 3 usable
    a = make_request("a", range(9))
    admit(kv, a)
    kv.free(a)  # blocks 1, 2 stay cached in the free queue, 3 is partial
    b = make_request("b", list(range(8)) + [70, 71, 72, 73, 74])  # 13 tokens: 4 blocks
    hits, num_cached = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2]
    assert num_cached == 8
    # 2 revived + 2 new > 3 free: refused, and the hits are still free and cached.
    assert not kv.allocate_slots(b, 5, hits)
    assert kv.num_free_blocks == 3
    assert [b.ref_cnt for b in hits] == [0, 0]
    assert sorted(kv.cached.values(), key=lambda blk: blk.block_id) == hits
    # 12 tokens fit: 2 revived + 1 new.
    c = make_request("c", list(range(8)) + [70, 71, 72, 73])
    assert admit(kv, c) == 8
    assert kv.block_ids("c") == [1, 2, 3]
    assert kv.num_free_blocks == 0


def test_block_table_grows_exactly_per_blocks_needed():
    kv = make_kv(9)
    req = make_request("r", range(5))
    admit(kv, req, num_new=3)  # chunk 1 of the prompt
    assert len(kv.block_ids("r")) == 1
    assert kv.allocate_slots(req, 2)  # rest of the prompt
    req.num_computed_tokens = 5
    assert kv.block_ids("r") == [1, 2]
    for step, token in enumerate(range(100, 112)):
        decode(kv, req, token)
        assert len(kv.block_ids("r")) == kv.blocks_needed(req.num_computed_tokens), step
    assert req.num_computed_tokens == 17
    assert kv.block_ids("r") == [1, 2, 3, 4, 5]
    assert kv.num_free_blocks == 3


def test_allocating_zero_tokens_within_the_table_takes_no_block():
    kv = make_kv()
    req = make_request("r", range(3))
    admit(kv, req)
    req.append_output_token(1)
    assert kv.allocate_slots(req, 1)  # position 3 is still in block 1
    assert kv.block_ids("r") == [1]


def test_free_returns_every_block():
    kv = make_kv(9)
    reqs = [make_request(str(i), range(10 * i, 10 * i + 6)) for i in range(4)]
    for r in reqs:
        admit(kv, r)
    assert kv.num_free_blocks == 0
    for r in reqs:
        kv.free(r)
    assert_all_free(kv)
    kv.free(reqs[0])  # freeing an unknown / already freed request is a no-op
    assert_all_free(kv)


def test_free_of_shared_blocks_keeps_them_until_the_last_user_goes():
    kv = make_kv(9)
    a = make_request("a", range(9))
    b = make_request("b", range(9))
    admit(kv, a)
    assert admit(kv, b) == 8
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert [kv.blocks[i].ref_cnt for i in kv.block_ids("a")] == [2, 2, 1]
    kv.free(a)
    assert [kv.blocks[i].ref_cnt for i in kv.block_ids("b")] == [1, 1, 1]
    assert kv.num_free_blocks == 8 - 3
    kv.free(b)
    assert_all_free(kv)


# ---- prefix cache -------------------------------------------------------------------------


def test_same_prompt_reuses_full_blocks_but_leaves_the_last_token_to_compute():
    kv = make_kv(9)
    a = make_request("a", range(9))  # two full blocks and one token
    assert admit(kv, a) == 0
    b = make_request("b", range(9))
    hits, num_cached = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2]
    assert num_cached == 8


@pytest.mark.parametrize(("prompt_len", "num_cached"), [(4, 0), (5, 4), (8, 4), (12, 8), (13, 12)])
def test_cache_hit_never_covers_the_whole_prompt(prompt_len, num_cached):
    kv = make_kv(9)
    a = make_request("a", range(prompt_len))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", range(prompt_len))
    assert admit(kv, b) == num_cached
    assert num_cached < b.num_tokens


def test_hit_after_free_revives_the_blocks():
    kv = make_kv(9)
    a = make_request("a", range(9))
    admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 8
    b = make_request("b", range(9))
    assert admit(kv, b) == 8
    assert kv.block_ids("b") == [1, 2, 4]  # block 3 (a's partial tail) was first in line
    assert kv.num_free_blocks == 5
    kv.free(b)
    assert_all_free(kv)


def test_prefix_hit_stops_at_the_first_different_block():
    kv = make_kv(9)
    admit(kv, make_request("a", range(13)))
    b = make_request("b", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12])
    assert admit(kv, b) == 4
    assert kv.block_ids("b")[0] == kv.block_ids("a")[0]
    assert kv.block_ids("b")[1] not in kv.block_ids("a")


def test_token_mismatch_under_a_matching_hash_is_rejected():
    kv = make_kv(9)
    a = make_request("a", range(9))
    admit(kv, a)
    # Simulate a hash collision: the cached block's tokens differ from the request's.
    kv.blocks[1].token_ids = (0, 1, 2, 42)
    b = make_request("b", range(9))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.stats.hits == 0


def test_token_mismatch_in_a_later_block_keeps_the_earlier_hits():
    kv = make_kv(9)
    admit(kv, make_request("a", range(13)))
    kv.blocks[2].token_ids = (4, 5, 6, 42)
    hits, num_cached = kv.get_computed_blocks(make_request("b", range(13)))
    assert [h.block_id for h in hits] == [1]
    assert num_cached == 4


def test_cache_salt_prevents_sharing_and_equal_salts_share():
    kv = make_kv(17)
    admit(kv, make_request("plain", range(9)))
    assert admit(kv, make_request("salted", range(9), salt="tenant-a")) == 0
    assert admit(kv, make_request("same-salt", range(9), salt="tenant-a")) == 8
    assert admit(kv, make_request("other-salt", range(9), salt="tenant-b")) == 0
    assert admit(kv, make_request("plain-again", range(9))) == 8
    assert kv.block_ids("same-salt")[:2] == kv.block_ids("salted")[:2]
    assert kv.block_ids("plain-again")[:2] == kv.block_ids("plain")[:2]


def test_request_block_hashes_follow_the_hash_chain_with_salt():
    kv = make_kv(9)
    req = make_request("r", range(9), salt="s")
    admit(kv, req)
    assert req.block_hashes == hash_block_chain(list(range(9)), BS, ("s",))
    decode(kv, req, 100)
    decode(kv, req, 101)
    decode(kv, req, 102)
    assert req.block_hashes == hash_block_chain(list(range(9)) + [100, 101, 102], BS, ("s",))
    assert len(req.block_hashes) == 3


def test_hit_and_query_counters():
    kv = make_kv(17)
    admit(kv, make_request("a", range(9)))
    assert (kv.stats.queries, kv.stats.hits) == (9, 0)
    assert kv.stats.hit_rate == 0.0
    admit(kv, make_request("b", range(9)))
    assert (kv.stats.queries, kv.stats.hits) == (18, 8)
    admit(kv, make_request("c", list(range(4)) + [50, 51, 52]))
    assert (kv.stats.queries, kv.stats.hits) == (25, 12)
    assert kv.stats.hit_rate == 12 / 25


def test_no_prefix_caching_means_no_hits_hashes_events_or_queries():
    kv = make_kv(9, enable_prefix_caching=False)
    a = make_request("a", range(9))
    admit(kv, a)
    b = make_request("b", range(9))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert admit(kv, b) == 0
    assert a.block_hashes == []
    assert kv.cached == {}
    assert kv.take_events() == []
    assert (kv.stats.queries, kv.stats.hits) == (0, 0)
    kv.free(a)
    kv.free(b)
    assert_all_free(kv)


def test_reset_prefix_cache():
    kv = make_kv(9)
    a = make_request("a", range(9))
    admit(kv, a)
    kv.take_events()
    assert kv.reset_prefix_cache() is False  # a holds blocks
    assert len(kv.cached) == 2
    assert kv.take_events() == []
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.cached == {}
    assert all(b.block_hash is None and b.token_ids is None for b in kv.blocks)
    assert kv.take_events() == [KVEvent("cleared")]
    assert admit(kv, make_request("b", range(9))) == 0
    assert kv.num_free_blocks == 5


# ---- LRU eviction -------------------------------------------------------------------------


def _fill_cache_with(kv, *prompts):
    reqs = [make_request(f"r{i}", p) for i, p in enumerate(prompts)]
    for r in reqs:
        admit(kv, r)
    return reqs


def test_unused_blocks_are_taken_before_cached_ones():
    kv = make_kv(9)
    (a,) = _fill_cache_with(kv, range(8))
    kv.free(a)
    assert list(kv.free_queue) == [3, 4, 5, 6, 7, 8, 2, 1]
    b = make_request("b", range(100, 108))
    admit(kv, b)
    assert kv.block_ids("b") == [3, 4]
    assert len(kv.cached) == 4


def test_least_recently_freed_is_evicted_first_and_tail_before_head():
    kv = make_kv(5)  # 4 usable
    a, b = _fill_cache_with(kv, range(8), range(100, 108))
    ha, hb = a.block_hashes, b.block_hashes
    assert kv.block_ids("r0") == [1, 2]
    assert kv.block_ids("r1") == [3, 4]
    kv.free(b)  # freed first: evicted first
    kv.free(a)
    kv.take_events()
    assert list(kv.free_queue) == [4, 3, 2, 1]  # each request's tail before its head
    c = make_request("c", range(200, 204))
    admit(kv, c)
    assert kv.block_ids("c") == [4]
    assert kv.take_events()[0] == KVEvent("removed", (hb[1],))
    d = make_request("d", range(300, 304))
    admit(kv, d)
    assert kv.block_ids("d") == [3]
    assert kv.take_events()[0] == KVEvent("removed", (hb[0],))
    # a's prefix is intact; b's is gone.
    assert set(kv.cached) >= {ha[0], ha[1]}
    assert hb[0] not in kv.cached and hb[1] not in kv.cached


def test_a_cache_hit_makes_the_block_most_recently_used():
    kv = make_kv(5)
    a, b = _fill_cache_with(kv, range(8), range(100, 108))
    kv.free(a)
    kv.free(b)
    assert list(kv.free_queue) == [2, 1, 4, 3]
    a2 = make_request("a2", range(5))  # hits a's head block only
    assert admit(kv, a2) == 4
    assert kv.block_ids("a2") == [1, 2]  # block 2 evicted (a's tail): LRU
    kv.free(a2)
    assert list(kv.free_queue) == [4, 3, 2, 1]
    admit(kv, make_request("x", range(400, 404)))
    assert kv.block_ids("x") == [4]


def test_eviction_emits_removed_and_forgets_the_hash():
    kv = make_kv(3)  # 2 usable
    (a,) = _fill_cache_with(kv, range(8))
    kv.free(a)
    kv.take_events()
    admit(kv, make_request("b", range(100, 108)))
    hb = hash_block_chain(list(range(100, 108)), BS)
    assert kv.take_events() == [
        KVEvent("removed", (a.block_hashes[1],)),
        KVEvent("removed", (a.block_hashes[0],)),
        KVEvent("stored", tuple(hb), NONE_HASH, ((100, 101, 102, 103), (104, 105, 106, 107))),
    ]
    assert set(kv.cached) == set(hb)
    assert kv.get_computed_blocks(make_request("a-again", range(9))) == ([], 0)


# ---- events -------------------------------------------------------------------------------


def test_stored_events_carry_hashes_parents_and_tokens_per_chunk():
    kv = make_kv(9)
    req = make_request("r", range(13))
    h = hash_block_chain(list(range(13)), BS)
    admit(kv, req, num_new=5)
    assert kv.take_events() == [KVEvent("stored", (h[0],), NONE_HASH, ((0, 1, 2, 3),))]
    assert kv.allocate_slots(req, 2)  # up to 7 tokens: no new full block, no event
    req.num_computed_tokens = 7
    assert kv.take_events() == []
    assert kv.allocate_slots(req, 6)  # up to 13 tokens: blocks 1 and 2 become full
    req.num_computed_tokens = 13
    assert kv.take_events() == [
        KVEvent("stored", (h[1], h[2]), h[0], ((4, 5, 6, 7), (8, 9, 10, 11)))
    ]
    for token in (50, 51, 52):
        decode(kv, req, token)
    h3 = hash_block(h[2], [12, 50, 51, 52])
    assert kv.take_events() == [KVEvent("stored", (h3,), h[2], ((12, 50, 51, 52),))]
    assert kv.take_events() == []


def test_cache_hits_are_not_stored_again():
    kv = make_kv(9)
    admit(kv, make_request("a", range(9)))
    kv.take_events()
    b = make_request("b", list(range(8)) + [60, 61, 62, 63, 64])
    admit(kv, b)
    h = b.block_hashes
    assert kv.take_events() == [KVEvent("stored", (h[2],), h[1], ((60, 61, 62, 63),))]


def test_no_events_when_not_recording():
    kv = make_kv(3, record_events=False)
    (a,) = _fill_cache_with(kv, range(8))
    kv.free(a)
    b = make_request("b", range(100, 108))
    admit(kv, b)  # evicts a's blocks
    kv.free(b)
    assert kv.reset_prefix_cache() is True
    assert kv.events == []
    assert kv.take_events() == []


def test_stored_events_give_every_block_its_true_parent():
    kv = make_kv(8)  # 7 usable
    prompt = list(range(8))
    a = make_request("a", prompt)
    admit(kv, a)  # blocks 1, 2 cached as h0, h1
    b = make_request("b", prompt)
    assert admit(kv, b) == 4  # hits h0 only (last token must be computed); own copy of h1
    for token in (100, 101, 102, 103):
        decode(kv, b, token)  # b's block 2 becomes full: stored as h2 (parent h1)
    kv.free(a)  # a's h1 block is free and cached
    filler = make_request("filler", range(500, 513))
    admit(kv, filler)  # takes the 3 unused blocks and evicts a's h1 block
    assert a.block_hashes[1] not in kv.cached
    kv.free(filler)
    kv.take_events()
    c = make_request("c", prompt + [100, 101, 102, 103] + [200, 201, 202, 203] + [9])
    assert admit(kv, c) == 4  # h0 hit; h1 evicted; h2 still cached by b; h3 new
    parents = dict(zip(c.block_hashes, [NONE_HASH] + c.block_hashes[:-1]))
    stored = [e for e in kv.take_events() if e.kind == "stored"]
    assert stored
    for event in stored:
        parent = event.parent_hash
        for block_hash in event.block_hashes:
            assert parents[block_hash] == parent
            parent = block_hash


def test_the_block_pool_is_built_as_blocks_are_first_used():
    """A cache of a million blocks costs nothing up front (a simulated fleet builds a
    thousand managers): block objects exist once handed out; the order is unchanged."""
    kv = make_kv(1_000_000)
    assert kv.num_free_blocks == kv.num_usable_blocks and len(kv._pool) == 1
    request = make_request("a", list(range(3 * BS)))
    assert kv.allocate_slots(request, 3 * BS)
    assert kv.block_ids("a") == [1, 2, 3] and len(kv._pool) == 4
    kv.free(request)
    assert kv.free_queue[:2] == [4, 5] and kv.free_queue[-3:] == [3, 2, 1]
    assert kv.num_free_blocks == kv.num_usable_blocks
