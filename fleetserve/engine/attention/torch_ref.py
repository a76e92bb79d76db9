"""Reference attention in plain PyTorch: runs on CPU and CUDA alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fleetserve.engine.attention.base import AttentionBackend, AttentionMetadata, register_backend


@register_backend
class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)
        value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
        key_cache.index_copy_(0, meta.slot_mapping, k.to(key_cache.dtype))
        value_cache.index_copy_(0, meta.slot_mapping, v.to(value_cache.dtype))

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

    def _decode(self, q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        nd = q.shape[0]
        seq_lens = meta.seq_lens_tensor[:nd]
        max_len = max(meta.seq_lens[:nd])
        num_blocks = -(-max_len // meta.block_size)
        table = meta.block_tables[:nd, :num_blocks]
        # k, v: [B, num_blocks * block_size, H_kv, D] -> [B, H_kv, L, D]
        k = kv_cache[0][table].flatten(1, 2).transpose(1, 2)
        v = kv_cache[1][table].flatten(1, 2).transpose(1, 2)
        positions = torch.arange(k.shape[2], device=q.device)
        mask = (positions[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )  # [B, H, 1, D]
        return out[:, :, 0, :]

    def _prefill(self, q, k, v, kv_cache, meta: AttentionMetadata, i: int, scale: float):
        q_len, seq_len = q.shape[0], meta.seq_lens[i]
        if seq_len > q_len:  # earlier tokens (a prefix hit or earlier chunks) are in the cache
            num_blocks = -(-seq_len // meta.block_size)
            table = meta.block_tables[i, :num_blocks]
            k = kv_cache[0][table].flatten(0, 1)[:seq_len].to(q.dtype)
            v = kv_cache[1][table].flatten(0, 1)[:seq_len].to(q.dtype)
            # query j sits at position seq_len - q_len + j and sees keys up to it
            rows = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
        return out.transpose(0, 1)
