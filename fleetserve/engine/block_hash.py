"""The prefix-cache key of a KV block: a hash chain over token ids (plus extra keys).

Pure and deterministic across processes (no Python `hash()`), so that a gateway can compute
the same keys from a prompt and match them against the KV events a replica publishes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack

NONE_HASH = 0  # parent of the first block


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """64-bit key of one full block, given the key of the block before it."""
    payload = msgpack.packb([parent_hash, list(token_ids), list(extra_keys)])
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def hash_block_chain(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple = (),
    start: Sequence[int] = (),
) -> list[int]:
    """Keys of every full block of `token_ids`; `start` are keys already known (a prefix of
    the result), so a growing request extends its chain instead of rehashing it."""
    hashes = list(start)
    parent = hashes[-1] if hashes else NONE_HASH
    for begin in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[begin : begin + block_size], extra_keys)
        hashes.append(parent)
    return hashes
