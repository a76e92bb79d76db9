"""An exact mirror of one replica's prefix cache, built from the KV events it publishes.

The replica keys each full KV block by a hash chain over its tokens
(`fleetserve.engine.block_hash`); it reports blocks `stored`, `removed`, and the whole cache
`cleared`. Mirroring those sets gives the gateway the very keys the replica will hit, so the
longest cached prefix of a prompt is a lookup, not a guess.
"""

from __future__ import annotations

from collections.abc import Container, Sequence


class PrefixIndex:
    def __init__(self) -> None:
        self.block_size: int | None = None
        self._blocks: set[int] = set()
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Forget everything (the event stream broke: what it missed is unknown)."""
        self._blocks.clear()

    def apply(self, batch: dict) -> None:
        """One message of `GET /v1/kv_events`: {"block_size": B, "events": [...]}."""
        block_size = batch.get("block_size")
        if block_size is not None and block_size != self.block_size:
            self._blocks.clear()  # keys of another block size never match
            self.block_size = int(block_size)
        for event in batch.get("events", ()):
            kind = event.get("kind")
            if kind == "stored":
                self._blocks.update(event.get("block_hashes", ()))
            elif kind == "removed":
                self._blocks.difference_update(event.get("block_hashes", ()))
            elif kind == "cleared":
                self._blocks.clear()
            self.events_applied += 1

    def match_prefix(self, block_hashes: Sequence[int]) -> int:
        """Number of leading blocks of a prompt's hash chain that are cached. Read-only."""
        return leading_blocks(block_hashes, self._blocks)


def leading_blocks(block_hashes: Sequence[int], held: Container[int]) -> int:
    """How many leading hashes of a chain `held` has: a block counts only after its
    predecessors (a chained hash names the whole prefix up to it)."""
    n = 0
    for h in block_hashes:
        if h not in held:
            break
        n += 1
    return n


class PrefixView:
    """Read-only face of a `PrefixIndex` handed to routing policies."""

    __slots__ = ("_index",)

    def __init__(self, index: PrefixIndex) -> None:
        self._index = index

    @property
    def block_size(self) -> int | None:
        return self._index.block_size

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    def match_prefix(self, block_hashes: Sequence[int]) -> int:
        blocks = self._index._blocks  # inlined `PrefixIndex.match_prefix`: routing's hot path
        n = 0
        for h in block_hashes:
            if h not in blocks:
                break
            n += 1
        return n


EMPTY_PREFIX = PrefixView(PrefixIndex())
