"""Linear layers whose weights oneDNN has reordered once, at load, for the CPU they run on.

``F.linear`` on CPU calls MKL's sgemm, which re-reads the weight in its (out, in) layout on
every call and is slow for the few rows of a decode step on AMD EPYC. oneDNN's linear takes a
weight laid out once in its blocked format (``mkldnn._reorder_linear_weight``) and then runs
2-3x faster at 1-8 rows (NOTES.md; ``benchmarks/profile_step.py`` inside the engine).

``pack_linears(model)`` is a rewrite after loading, like ``quantize_int8``: it swaps every
float ``nn.Linear`` (fused q/k/v and gate/up included) for a ``PackedLinear`` and gives a model
with tied embeddings a packed copy of them as its ``lm_head``. ``F.linear`` stays the reference:
it is what runs on CUDA, in float16, without oneDNN, and for int8 weights (``Int8Linear`` has
its own kernels). The packed result differs from ``F.linear`` only by summation order.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN computes a linear with this weight natively here: a CPU tensor in float32,
    or in bfloat16 where the CPU has bf16 instructions (elsewhere oneDNN emulates bf16 slowly)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with W in oneDNN's blocked layout. The packed weight is an opaque
    oneDNN tensor: it is not a parameter, cannot be saved or moved, and only this forward
    reads it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        assert can_pack(weight), (weight.device, weight.dtype)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.dtype = weight.dtype
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.register_buffer("weight", packed, persistent=False)  # (out, in), opaque layout
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn-packed"


def pack_linears(model: nn.Module) -> int:
    """Packs every ``nn.Linear`` of ``model`` whose weight ``can_pack``, and a tied output
    embedding (``model.lm_head is None``) into a packed ``lm_head`` (a copy: the embedding
    lookup keeps the original). Frees each float weight as it goes. Returns the number of
    modules packed; 0 (and the model unchanged) on CUDA, in float16 or without oneDNN."""
    # Names only: holding the modules would keep every float weight alive until the end,
    # doubling the peak memory of a large model.
    names = [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and can_pack(m.weight)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear.from_linear(getattr(parent, child)))
    packed = len(names)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(model, "lm_head", 0) is None and embedding is not None:
        if can_pack(embedding.weight):
            model.lm_head = PackedLinear(embedding.weight, None)
            packed += 1
    if packed:
        logger.info("packed %d linear layers for oneDNN", packed)
    return packed
