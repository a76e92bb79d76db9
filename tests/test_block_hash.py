"""The prefix-cache key chain: deterministic, incremental, salted, full blocks only."""

from __future__ import annotations

import hashlib

import msgpack

from fleetserve.engine.block_hash import NONE_HASH, hash_block, hash_block_chain

TOKENS = list(range(100, 111))  # 11 tokens: two full blocks of 4, and 3 left over


def test_hash_block_is_blake2b_of_msgpack_so_any_process_can_recompute_it():
    payload = msgpack.packb([NONE_HASH, [1, 2, 3, 4], []])
    expected = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")
    assert hash_block(NONE_HASH, [1, 2, 3, 4]) == expected
    assert 0 <= expected < 2**64


def test_hash_block_is_the_same_across_calls_and_sequence_types():
    assert hash_block(7, [1, 2, 3, 4]) == hash_block(7, (1, 2, 3, 4))
    assert hash_block(7, [1, 2, 3, 4]) == hash_block(7, [1, 2, 3, 4])


def test_hash_block_depends_on_parent_tokens_order_and_extra_keys():
    base = hash_block(NONE_HASH, [1, 2, 3, 4])
    assert hash_block(1, [1, 2, 3, 4]) != base
    assert hash_block(NONE_HASH, [1, 2, 4, 3]) != base
    assert hash_block(NONE_HASH, [1, 2, 3, 4], ("salt",)) != base
    assert hash_block(NONE_HASH, [1, 2, 3, 4], ("a",)) != hash_block(
        NONE_HASH, [1, 2, 3, 4], ("b",)
    )


def test_chain_hashes_only_full_blocks_each_from_its_parent():
    h0 = hash_block(NONE_HASH, TOKENS[0:4])
    h1 = hash_block(h0, TOKENS[4:8])
    assert hash_block_chain(TOKENS, 4) == [h0, h1]
    assert hash_block_chain(TOKENS[:8], 4) == [h0, h1]
    assert hash_block_chain(TOKENS[:7], 4) == [h0]
    assert hash_block_chain(TOKENS[:3], 4) == []
    assert hash_block_chain([], 4) == []


def test_chain_is_deterministic_across_calls():
    assert hash_block_chain(TOKENS, 4) == hash_block_chain(list(TOKENS), 4)
    assert hash_block_chain(TOKENS, 1) == hash_block_chain(TOKENS, 1)
    assert len(hash_block_chain(TOKENS, 1)) == 11


def test_chain_of_a_prefix_is_a_prefix_of_the_chain():
    full = hash_block_chain(TOKENS + [5, 6, 7, 8, 9], 4)
    assert full[:2] == hash_block_chain(TOKENS, 4)
    assert len(full) == 4


def test_extending_from_start_equals_hashing_from_scratch():
    grown = TOKENS + [1, 2, 3, 4, 5, 6]  # 17 tokens: four full blocks
    start = hash_block_chain(TOKENS, 4)
    extended = hash_block_chain(grown, 4, start=start)
    assert extended == hash_block_chain(grown, 4)
    assert len(extended) == 4
    assert start == hash_block_chain(TOKENS, 4)  # `start` is not mutated


def test_start_is_trusted_not_recomputed():
    # The caller vouches for `start`: the chain continues from its last key.
    extended = hash_block_chain(TOKENS, 4, start=[123])
    assert extended == [123, hash_block(123, TOKENS[4:8])]


def test_start_covering_every_full_block_adds_nothing():
    start = hash_block_chain(TOKENS, 4)
    assert hash_block_chain(TOKENS, 4, start=start) == start


def test_extra_keys_change_every_hash_of_the_chain():
    plain = hash_block_chain(TOKENS, 4)
    salted = hash_block_chain(TOKENS, 4, ("adapter-1",))
    other = hash_block_chain(TOKENS, 4, ("adapter-2",))
    assert len(salted) == 2
    assert all(a != b for a, b in zip(plain, salted))
    assert all(a != b for a, b in zip(salted, other))
    h0 = hash_block(NONE_HASH, TOKENS[0:4], ("adapter-1",))
    assert salted == [h0, hash_block(h0, TOKENS[4:8], ("adapter-1",))]


def test_same_tokens_at_different_depths_hash_differently():
    tokens = [9, 9, 9, 9] * 3
    h = hash_block_chain(tokens, 4)
    assert len(set(h)) == 3
