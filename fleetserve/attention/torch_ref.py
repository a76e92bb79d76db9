"""Reference attention in plain PyTorch: runs on CPU and CUDA alike.

KV cache of one layer: ``(2, num_kv_heads, num_blocks, block_size, head_dim)``, head-major, so
that gathering a sequence's blocks yields ``[H_kv, L, D]`` rows that matmuls read as they
are, with no transposed copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fleetserve.attention.base import AttentionBackend, AttentionMetadata


class TorchAttention(AttentionBackend):
    name = "torch"
    # Decode sizes its gather from max(seq_lens), which a graph fixes at the block table's
    # capacity: exact under a graph (it masks with seq_lens_tensor), but every step would
    # gather K and V for the whole max_model_len of every row (an 8B model at 128k
    # positions: tens of GiB at batch 256, and slower than eager). The engine does not
    # capture it; tests drive DecodeGraphs with it directly, as the reference.
    supports_cuda_graphs = False

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim) -> tuple[int, ...]:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self.write_kv(k, v, kv_cache, meta)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta, scale)
        for i in range(nd, meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            out[start:end] = self._prefill(
                q[start:end], k[start:end], v[start:end], kv_cache, meta, i, scale
            )
        return out

    @staticmethod
    def write_kv(k, v, kv_cache, meta: AttentionMetadata) -> None:
        """The step's new K/V into their slots."""
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        slots = kv_cache.view(2, num_kv_heads, -1, head_dim)  # [2, H_kv, num_slots, D]
        slots[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(kv_cache.dtype))
        slots[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(kv_cache.dtype))

    def _decode(self, q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """One query per sequence against its paged K/V, as two batched matmuls over
        (KV head, sequence) with the query heads of a group side by side. On CPU this beats
        SDPA with a padding mask several times over."""
        nd, num_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[1]
        max_len = max(meta.seq_lens[:nd])
        num_blocks = -(-max_len // meta.block_size)
        length = num_blocks * meta.block_size
        table = meta.block_tables[:nd, :num_blocks]
        k = kv_cache[0][:, table].view(num_kv_heads, nd, length, head_dim)  # [H_kv, B, L, D]
        v = kv_cache[1][:, table].view(num_kv_heads, nd, length, head_dim)
        group = num_heads // num_kv_heads
        q = q.view(nd, num_kv_heads, group, head_dim).transpose(0, 1)  # [H_kv, B, G, D]
        scores = torch.matmul(q, k.transpose(2, 3).to(q.dtype)).float()  # [H_kv, B, G, L]
        pad = torch.arange(length, device=q.device)[None, :] >= meta.seq_lens_tensor[:nd, None]
        scores.mul_(scale).masked_fill_(pad[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        out = torch.matmul(probs, v.to(q.dtype))  # [H_kv, B, G, D]
        return out.transpose(0, 1).reshape(nd, num_heads, head_dim)

    def _prefill(self, q, k, v, kv_cache, meta: AttentionMetadata, i: int, scale: float):
        """One sequence's chunk. Inputs get a batch dim of 1: SDPA takes its fast (flash)
        CPU kernel only for 4-D inputs."""
        q_len, seq_len = q.shape[0], meta.seq_lens[i]
        q = q.transpose(0, 1)[None]  # [1, H, q_len, D]
        if seq_len > q_len:  # earlier tokens (a prefix hit or earlier chunks) are in the cache
            num_kv_heads, head_dim = kv_cache.shape[1], kv_cache.shape[4]
            num_blocks = -(-seq_len // meta.block_size)
            table = meta.block_tables[i, :num_blocks]
            k = kv_cache[0][:, table].view(num_kv_heads, -1, head_dim)[:, :seq_len].to(q.dtype)
            v = kv_cache[1][:, table].view(num_kv_heads, -1, head_dim)[:, :seq_len].to(q.dtype)
            # query j sits at position seq_len - q_len + j and sees keys up to it
            rows = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(
                q, k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
            )
        else:
            out = F.scaled_dot_product_attention(
                q,
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
        return out[0].transpose(0, 1)
