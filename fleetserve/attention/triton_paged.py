"""The Triton paged-attention kernel (`triton_kernels`) as a backend, for CUDA caches.

Same cache layout as the torch reference, ``(2, num_kv_heads, num_blocks, block_size,
head_dim)``, and the same K/V write (``index_copy_`` by slot_mapping), so the two are
interchangeable on one cache. Decodes go to one launch (one program per sequence and KV
head, the GQA group's query heads sharing each K/V load), prefill chunks (over cached blocks
or not) to a second one with a causal mask. The decode launch reads only tensors, so a CUDA
graph captures it (`supports_cuda_graphs`).

Off CUDA the kernel runs only in Triton's interpreter (``TRITON_INTERPRET=1``: tests on a
CPU machine); otherwise a CPU cache goes to the reference. Constructing it raises
`TritonUnavailable` when triton does not import or there is nowhere to run it.
"""

from __future__ import annotations

import os

import torch

from fleetserve.attention.base import AttentionMetadata
from fleetserve.attention.torch_ref import TorchAttention


class TritonUnavailable(RuntimeError):
    """Triton cannot run here; the message says why."""


def interpreting() -> bool:
    """Triton's CPU interpreter is on: kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def problem() -> str | None:
    """Why the Triton backend cannot run here, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton does not import ({e})"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device (Triton kernels need one, or TRITON_INTERPRET=1)"
    return None


class TritonPagedAttention(TorchAttention):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        why = problem()
        if why is not None:
            raise TritonUnavailable(why)
        from fleetserve.attention import triton_kernels

        self._kernels = triton_kernels

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if kv_cache.device.type != "cuda" and not interpreting():
            return super().forward(q, k, v, kv_cache, meta, scale)
        self.write_kv(k, v, kv_cache, meta)
        q_dtype, q = q.dtype, q.to(kv_cache.dtype)
        out = torch.empty_like(q)
        nd, num_seqs = meta.num_decodes, meta.num_seqs
        common = dict(out=out, q=q, kv_cache=kv_cache, block_tables=meta.block_tables)
        self._kernels.paged_attention(
            **common,
            seq_lens=meta.seq_lens_tensor,
            query_start_loc=None,
            scale=scale,
            first_seq=0,
            num_seqs=nd,
            max_query_len=1,
            decode=True,
        )
        if num_seqs > nd:
            qsl = meta.query_start_loc
            self._kernels.paged_attention(
                **common,
                seq_lens=meta.seq_lens_tensor,
                query_start_loc=_query_start_tensor(meta, q.device),
                scale=scale,
                first_seq=nd,
                num_seqs=num_seqs - nd,
                max_query_len=max(qsl[i + 1] - qsl[i] for i in range(nd, num_seqs)),
                decode=False,
            )
        return out.to(q_dtype)


def _query_start_tensor(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """`meta.query_start_loc` on the device, made once per step (every layer reuses it)."""
    if meta.query_start_loc_tensor is None or meta.query_start_loc_tensor.device != device:
        meta.query_start_loc_tensor = torch.tensor(
            meta.query_start_loc, dtype=torch.int64, device=device
        )
    return meta.query_start_loc_tensor
