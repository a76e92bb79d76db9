"""The contract between the model runner, the model and an attention backend.

One step runs one forward over a *flattened* batch: the new tokens of every scheduled
sequence, decodes first (one token each, in order), then prefill chunks. Sequence ``i`` owns
query rows ``query_start_loc[i]:query_start_loc[i+1]`` and, after this step, has
``seq_lens[i]`` tokens of K/V in the blocks of ``block_tables[i]``.

In a CUDA graph (decode steps only, `cuda_graphs`) the Python-side lists are fixed at capture:
``seq_lens`` then holds upper bounds (the block table's capacity) and only the tensors
(``seq_lens_tensor``, ``block_tables``, ``slot_mapping``) hold the step's values. A backend
with ``supports_cuda_graphs`` sizes nothing from the lists' values in a decode-only step
beyond what such bounds allow, and masks with ``seq_lens_tensor``.

KV cache of one layer: a tensor whose shape the backend chooses (`kv_cache_shape`); slot
``s`` is block ``s // block_size``, offset ``s % block_size``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fleetserve.attention.ops import TorchOps


@dataclass(frozen=True)
class SeqSpec:
    """One sequence of a step, as the runner describes it."""

    num_computed_tokens: int  # tokens already in the cache before this step
    num_new_tokens: int  # query length this step
    block_ids: list[int]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: cache slot of each new token's K/V
    query_start_loc: list[int]  # (num_seqs + 1,) cumulative query lengths
    seq_lens: list[int]  # (num_seqs,) K/V length after this step
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int64, padded with block 0
    num_decodes: int  # sequences [0, num_decodes) have query length 1
    seq_lens_tensor: torch.Tensor  # (num_seqs,) int64, on the device
    block_size: int
    # query_start_loc on the device, made by a backend that needs it, once per step
    query_start_loc_tensor: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class ForwardContext:
    """Everything a model's forward needs besides the tokens: passed down explicitly, never
    stored in a global."""

    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one per layer
    backend: AttentionBackend


def build_attention_metadata(
    seqs: list[SeqSpec], block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for sequences given decodes first. Raises if a decode follows a prefill."""
    query_start_loc = [0]
    seq_lens = []
    slots: list[int] = []
    num_decodes = 0
    for i, s in enumerate(seqs):
        if s.num_new_tokens == 1 and s.num_computed_tokens > 0:
            assert num_decodes == i, "decodes must come before prefills"
            num_decodes += 1
        end = s.num_computed_tokens + s.num_new_tokens
        assert len(s.block_ids) * block_size >= end, "block table too short"
        ids = s.block_ids
        slots += [
            ids[pos // block_size] * block_size + pos % block_size
            for pos in range(s.num_computed_tokens, end)
        ]
        query_start_loc.append(query_start_loc[-1] + s.num_new_tokens)
        seq_lens.append(end)
    max_blocks = max((len(s.block_ids) for s in seqs), default=0)
    # One tensor from padded rows: a tensor and a copy per row cost more than the rows.
    rows = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs]
    table = torch.tensor(rows, dtype=torch.int64).view(len(seqs), max_blocks)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=table.to(device),
        num_decodes=num_decodes,
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        block_size=block_size,
    )


class AttentionBackend(ABC):
    """Computes attention for one layer and writes the step's K/V into the cache.

    Contract: all new K/V of the step are written before any query reads the cache, so a
    sequence may read blocks that another sequence of the same step fills (prefix sharing).
    """

    name: str
    # A decode-only forward reads only tensors (or the lists' upper bounds): capturable.
    supports_cuda_graphs: bool = False
    # The layer's element-wise ops (norms, RoPE, SiLU) that go with this backend: the torch
    # reference unless a backend brings kernels.
    ops: TorchOps = TorchOps()

    @staticmethod
    @abstractmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor."""

    def new_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        shape = self.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        return torch.zeros(shape, dtype=dtype, device=device)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        v: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # this layer's, shaped as `kv_cache_shape` says
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        ...
