"""The C++ paged-attention kernel (csrc/paged_attention.cpp) as a backend, for CPU caches.

Same cache layout as the torch reference, ``(2, num_kv_heads, num_blocks, block_size,
head_dim)``, so the two are interchangeable on one cache; the K/V write is the reference's
``index_copy_``. The kernel takes decodes and short chunks over cached tokens; longer chunks
go to SDPA, whose GEMM-based kernels are faster once a chunk has tens of rows (one core,
fp32, SmolLM2's heads, best CPU time of 5: the kernel took 0.45x torch's time for 8 rows
after 128 cached, 0.85x for 16 after 512, 1.05x for 32 after 512, 1.3x for 128 after 512).
What the kernel does not cover (a CUDA cache, float16) goes to the reference. Constructing it raises
`ExtensionUnavailable` when the kernel cannot be built or loaded.
"""

from __future__ import annotations

import torch

from fleetserve.attention import cpu_extension
from fleetserve.attention.base import AttentionMetadata
from fleetserve.attention.cpu_ops import CpuOps
from fleetserve.attention.torch_ref import TorchAttention

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# Longest chunk over cached tokens that the kernel takes; longer ones go to SDPA.
MAX_KERNEL_CHUNK = 16


def kernel_sequences(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    """(sequences for the kernel, sequences for SDPA): every decode, and chunks of at most
    MAX_KERNEL_CHUNK tokens with tokens cached before them, go to the kernel."""
    kernel, sdpa = [], []
    for i, seq_len in enumerate(meta.seq_lens):
        q_len = meta.query_start_loc[i + 1] - meta.query_start_loc[i]
        cached = seq_len > q_len
        (kernel if cached and q_len <= MAX_KERNEL_CHUNK else sdpa).append(i)
    return kernel, sdpa


def _heads_contiguous(x: torch.Tensor) -> bool:
    """(tokens, heads, D) with each token's heads side by side: a view into the fused qkv
    rows is, and the kernels take it as it is."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


class CpuPagedAttention(TorchAttention):
    name = "cpu"
    supports_cuda_graphs = False  # CPU only; the kernel takes the Python lists

    def __init__(self) -> None:
        cpu_extension.load()
        self.ops = CpuOps()
        # Every layer of a step gets the same metadata: split its sequences once.
        self._split_of: tuple[AttentionMetadata | None, tuple[list[int], list[int]]] = (
            None,
            ([], []),
        )

    def _split(self, meta: AttentionMetadata) -> tuple[list[int], list[int]]:
        if self._split_of[0] is not meta:
            self._split_of = (meta, kernel_sequences(meta))
        return self._split_of[1]

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if kv_cache.device.type != "cpu" or kv_cache.dtype not in KERNEL_DTYPES:
            return super().forward(q, k, v, kv_cache, meta, scale)
        if k.dtype == v.dtype == kv_cache.dtype and _heads_contiguous(k) and _heads_contiguous(v):
            torch.ops.fleetserve.write_kv(kv_cache, k, v, meta.slot_mapping)
        else:
            self.write_kv(k, v, kv_cache, meta)
        kernel, sdpa = self._split(meta)
        out = torch.empty(q.shape, dtype=kv_cache.dtype)
        if kernel:
            q_in = q.to(kv_cache.dtype)
            torch.ops.fleetserve.paged_attention(
                out,
                q_in if _heads_contiguous(q_in) else q_in.contiguous(),
                kv_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.seq_lens,
                kernel,
                scale,
            )
        for i in sdpa:
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            out[start:end] = self._prefill(
                q[start:end], k[start:end], v[start:end], kv_cache, meta, i, scale
            )
        return out.to(q.dtype)
