"""CUDA graphs for decode steps: the model's forward captured once per batch size, replayed.

A decode step of a small model on a GPU is mostly launch overhead (every layer launches ~15
kernels of a few microseconds each); a graph replays them all with one launch (on an H200, a
100M model's batch-1 step: 6.6 ms eager, 1.45 ms replayed; benchmarks/README.md, "GPU").
What a graph reads must sit at fixed addresses, so the step's inputs go into persistent
buffers, allocated once at the largest captured size:

    input_ids, positions, slot_mapping, seq_lens: (max_size,)
    block_tables: (max_size, max_blocks_per_seq)

A decode batch of n sequences runs the graph of the smallest captured size >= n
(`capture_sizes`: 1, 2, 4, 8, then powers of two and the midpoints between them: above 8,
padding adds at most half a batch). Padding rows are harmless: token 0 at position 0, K/V
written to slot 0 of the null block (`NULL_BLOCK_ID`, never allocated to a request), and a
length of 1 that reads that slot back. Prefill and mixed steps stay eager (their shapes vary
with every chunk).

The captured metadata's Python lists are fixed at capture (see `attention.base`): seq_lens
holds the block table's capacity, the tensors hold the step's values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fleetserve.attention import AttentionBackend, AttentionMetadata, ForwardContext
from fleetserve.engine.kv_cache_manager import NULL_BLOCK_ID

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512  # vLLM's default ceiling too
# Columns of a packed host row: [token id, position, slot, seq_len, block ids...]
_ID, _POS, _SLOT, _LEN, _TABLE = 0, 1, 2, 3, 4


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture, ascending, the last one >= min(max_batch, MAX_CAPTURE_SIZE):
    1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, ..."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    limit = min(max_batch, MAX_CAPTURE_SIZE)
    every = [1, 2, 4] + [m for p in (8, 16, 32, 64, 128, 256) for m in (p, p * 3 // 2)] + [512]
    return [s for s in every if s < limit] + [next(s for s in every if s >= limit)]


def padded_size(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds n rows; None when n exceeds them all."""
    return next((s for s in sizes if s >= n), None)


@dataclass(frozen=True)
class DecodeRow:
    """One sequence of a decode step: the token at `position` and the blocks it owns."""

    token_id: int
    position: int
    block_ids: Sequence[int]


def pack_decode_rows(rows: Sequence[DecodeRow], size: int, block_size: int) -> torch.Tensor:
    """The step's inputs as one host tensor of `size` rows, padding rows included:
    ``[token id, position, slot, seq_len, block ids...]`` (int64), as wide as the longest
    block table. Each row's slot is where its new K/V goes."""
    if len(rows) > size:
        raise ValueError(f"{len(rows)} rows do not fit a graph of size {size}")
    width = max((len(r.block_ids) for r in rows), default=1)
    packed = torch.zeros((size, _TABLE + width), dtype=torch.int64)
    packed[:, _LEN] = 1  # padding rows: slot 0 of the null block, read back as length 1
    packed[:, _TABLE] = NULL_BLOCK_ID
    if not rows:
        return packed
    table = [[*r.block_ids, *[NULL_BLOCK_ID] * (width - len(r.block_ids))] for r in rows]
    heads = []
    for r in rows:
        pos = r.position
        slot = r.block_ids[pos // block_size] * block_size + pos % block_size
        heads.append([r.token_id, pos, slot, pos + 1])
    packed[: len(rows), :_TABLE] = torch.tensor(heads, dtype=torch.int64)
    packed[: len(rows), _TABLE:] = torch.tensor(table, dtype=torch.int64)
    return packed


class GraphRecorder(Protocol):
    """How a forward is captured and replayed: CUDA graphs, or an eager stand-in for tests
    of the buffer bookkeeping on a CPU."""

    def new_pool(self) -> object: ...

    def synchronize(self) -> None: ...

    def record(
        self, forward: Callable[[], torch.Tensor], pool: object
    ) -> tuple[Callable[[], object], torch.Tensor]:
        """(replay, output): replay() recomputes output in place from the buffers."""
        ...


class CudaGraphRecorder:
    def new_pool(self) -> object:
        return torch.cuda.graph_pool_handle()

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def record(self, forward, pool):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
        return graph.replay, out


class DecodeGraphs:
    """Persistent decode inputs and one captured graph per size in `sizes`. `capture()` once
    (after the KV caches exist); then `run(rows)` for any decode step that `fits`."""

    def __init__(
        self,
        model,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        *,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        device: torch.device,
        recorder: GraphRecorder | None = None,
    ) -> None:
        self.recorder = recorder or CudaGraphRecorder()
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.sizes = capture_sizes(max_batch)
        top = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(top, **i64)
        self.positions = torch.zeros(top, **i64)
        self.slot_mapping = torch.zeros(top, **i64)
        self.seq_lens = torch.ones(top, **i64)
        self.block_tables = torch.full((top, self.max_blocks), NULL_BLOCK_ID, **i64)
        self.graphs: dict[int, tuple[Callable[[], object], torch.Tensor]] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=list(range(size + 1)),
            seq_lens=[self.max_blocks * self.block_size] * size,  # upper bounds, see base
            block_tables=self.block_tables[:size],
            num_decodes=size,
            seq_lens_tensor=self.seq_lens[:size],
            block_size=self.block_size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        ctx = ForwardContext(self._metadata(size), self.kv_caches, self.backend)
        return self.model(self.input_ids[:size], self.positions[:size], ctx)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every size, largest first (the others reuse its memory pool). The buffers
        hold padding rows meanwhile: warm-up runs write only the null block."""
        pool = self.recorder.new_pool()
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: compiles kernels, creates library handles
            self.recorder.synchronize()
            self.graphs[size] = self.recorder.record(lambda n=size: self._forward(n), pool)
        self.recorder.synchronize()
        logger.info("CUDA graphs captured for decode batch sizes %s", self.sizes)

    def fits(self, num_rows: int, longest_table: int, last_position: int) -> bool:
        return (
            num_rows <= self.sizes[-1]
            and longest_table <= self.max_blocks
            and last_position < self.max_model_len
        )

    def run(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """Hidden states (len(rows), hidden_size) of one decode step: the rows go into the
        buffers (padding after them), the graph of the padded size replays. The result is a
        view of the graph's output: use it before the next `run`."""
        size = padded_size(len(rows), self.sizes)
        assert size is not None, "run() only batches that fit()"
        packed = pack_decode_rows(rows, size, self.block_size)
        width = packed.shape[1] - _TABLE
        self.input_ids[:size].copy_(packed[:, _ID])
        self.positions[:size].copy_(packed[:, _POS])
        self.slot_mapping[:size].copy_(packed[:, _SLOT])
        self.seq_lens[:size].copy_(packed[:, _LEN])
        # Columns past `width` keep older block ids: valid ids, never read (masked by length).
        self.block_tables[:size, :width].copy_(packed[:, _TABLE:])
        replay, out = self.graphs[size]
        replay()
        return out[: len(rows)]
