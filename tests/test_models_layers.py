"""Small model layers against transformers' op-by-op formulas."""

from __future__ import annotations

import pytest
import torch

from fleetserve.models.layers import RMSNorm


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op by op."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (3, 9, 32), (200, 768)])
def test_fused_rms_norm_equals_transformers(dtype, shape):
    g = torch.Generator().manual_seed(shape[0])
    norm = RMSNorm(shape[-1], 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    expected = _rms_norm_reference(x, norm.weight, norm.eps)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)
