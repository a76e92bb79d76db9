"""The element-wise ops of a decoder layer, behind one interface that attention backends carry
(``ctx.backend.ops``), so that a backend with kernels can fuse them and the model stays one.

`TorchOps` is the reference: plain torch, any device and dtype, the arithmetic of transformers
(normalize in float32 and cast back, RoPE in float32, SiLU then the product in the model's
dtype). `fleetserve.attention.cpu_ops.CpuOps` computes the same in one C++ pass per op. The
residual stream follows vLLM's shape: a layer hands on ``(hidden, residual)`` and the next
norm adds them, so that the add and the norm are one op where a kernel fuses them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: normalize in float32, cast back, then scale."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ "Rotate half" RoPE. x: (T, H, D); cos/sin: (T, 1, D/2). Computed in float32, returned
    in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class TorchOps:
    """The reference. Never modifies its inputs."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x). Kernels may reuse x's and residual's
        storage for the results: a caller must not read them afterwards."""
        residual = residual + x
        return rms_norm(residual, weight, eps), residual

    def rope_state(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> Any:
        """What `rope` needs for this step's positions, computed once for all layers.
        cos_sin_cache: float32 (max_position, D), cos then sin of each position."""
        cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # (T, 1, D/2)
        return cos, sin

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (T, H, D), k: (T, H_kv, D) rotated; kernels may rotate them in place."""
        cos, sin = state
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x = [gate | up] (T, 2I) -> silu(gate) * up (T, I)."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
