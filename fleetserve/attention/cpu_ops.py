"""`TorchOps` computed by the C++ kernels of csrc/fused_ops.cpp, one pass per op.

At decode batch sizes a layer's norms, RoPE and SiLU are ~40 small torch calls, each paying
the dispatcher and a trip through memory; the kernels make them 4 calls. They round where
the reference rounds (`fleetserve.attention.ops`), so bf16 results agree with it but for the
order of fp32 sums. Tensors the kernels do not take (not on the CPU, float16, odd strides)
go to the reference.
"""

from __future__ import annotations

from typing import Any

import torch

from fleetserve.attention import cpu_extension
from fleetserve.attention.ops import TorchOps

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _rows_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and x.dim() == 2 and x.stride(1) == 1


class CpuOps(TorchOps):
    name = "cpu"

    def __init__(self) -> None:
        cpu_extension.load()  # raises ExtensionUnavailable

    def rms_norm(self, x, weight, eps):
        if not (_rows_ok(x) and weight.dtype == x.dtype):
            return super().rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        torch.ops.fleetserve.rms_norm(out, x, weight, eps)
        return out

    def add_rms_norm(self, x, residual, weight, eps):
        if not (
            _rows_ok(x)
            and residual.shape == x.shape
            and _rows_ok(residual)
            and residual.dtype == weight.dtype == x.dtype
        ):
            return super().add_rms_norm(x, residual, weight, eps)
        torch.ops.fleetserve.add_rms_norm(x, residual, weight, eps)  # both in place
        return x, residual

    def rope_state(self, positions, cos_sin_cache) -> Any:
        return positions, cos_sin_cache  # the kernel looks the positions up itself

    def rope(self, q, k, state):
        positions, cache = state
        head_dim = q.shape[-1]
        if not (
            q.device.type == "cpu"
            and q.dtype in KERNEL_DTYPES
            and k.dtype == q.dtype
            and q.stride(-1) == 1
            and q.stride(-2) == head_dim
            and k.stride(-1) == 1
            and k.stride(-2) == head_dim
            and positions.dtype == torch.int64
            and positions.is_contiguous()
        ):
            return super().rope(q, k, super().rope_state(positions, cache))
        torch.ops.fleetserve.rotary_embedding(q, k, positions, cache)
        return q, k

    def silu_and_mul(self, x):
        if not _rows_ok(x):
            return super().silu_and_mul(x)
        out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype)
        torch.ops.fleetserve.silu_and_mul(out, x)
        return out
