"""Weight-only int8 quantization made on load: symmetric, one scale per output channel.

``W ~= weight_int8 * scale[:, None]``, so ``x @ W.T = (x @ weight_int8.T) * scale``: the scale
applies to the output. Activations stay in floating point. The forward either converts the
int8 weight to the activation dtype and calls the ordinary matmul (any device), or, for a few
rows of bf16/fp16 on CPU, calls aten's int8 x float kernel. Linear weights take 4x less memory
than float32 (2x less than bf16); speed and perplexity: ``benchmarks/quantization.py``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int8",)
# On CPU, up to this many rows of bf16/fp16 activations go through aten's int8 x float kernel,
# which reads the int8 weight directly: 1.4-2x faster than converting the weight and calling
# the bf16 matmul at 1-8 rows, slower from 16 rows, and 30-100x slower with float32 activations
# (measured on x86-64, 1 thread, torch 2.13; K, N = 576, 1728).
_INT8PACK_MAX_ROWS = 8


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) in the activation dtype
        self.register_buffer("bias", bias)  # (out,) or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        # Round the scale to its storage dtype first, so the int8 values fit the stored scale.
        # A row whose scale underflows (all zeros, or tiny in float16) quantizes to zeros.
        scale = (w.float().abs().amax(dim=1) / 127).to(w.dtype)
        divisor = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        q = torch.round(w.float() / divisor).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        if x.device.type == "cpu" and x.dtype != torch.float32 and x.shape[0] <= _INT8PACK_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(root: nn.Module) -> int:
    """Replaces every ``nn.Linear`` under ``root`` (e.g. the decoder layers) with an
    ``Int8Linear``, freeing the float weights one module at a time. Returns the number of
    modules swapped."""
    targets = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, Int8Linear.from_linear(linear))
    logger.info("int8: quantized %d linear layers", len(targets))
    return len(targets)
