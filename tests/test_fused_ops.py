"""The fused C++ layer ops (csrc/fused_ops.cpp via `CpuOps`) against the torch reference
(`TorchOps`): same results in fp32 up to summation order, and in bf16 the same roundings."""

from __future__ import annotations

import pytest
import torch
from attention_backends import needs_kernel

from fleetserve.attention.ops import TorchOps

REF = TorchOps()


@pytest.fixture(scope="module")
def cpu_ops():
    from fleetserve.attention.cpu_ops import CpuOps

    return CpuOps()


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in bf16 steps (same-sign values)."""
    ai = a.view(torch.int16).int()
    bi = b.view(torch.int16).int()
    return int((ai - bi).abs().max())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_rms_norm(cpu_ops, dtype, rows):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    w = (torch.rand(576) + 0.5).to(dtype)
    x0 = x.clone()
    got = cpu_ops.rms_norm(x, w, 1e-5)
    want = REF.rms_norm(x, w, 1e-5)
    assert torch.equal(x, x0)  # the input is left alone
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert bf16_ulps(got, want) <= 2  # a 1-step difference before the scaling
        assert (got != want).float().mean() < 0.01


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(cpu_ops, dtype):
    torch.manual_seed(1)
    x = torch.randn(37, 768).to(dtype)
    residual = torch.randn(37, 768).to(dtype)
    w = torch.rand(768).to(dtype)
    want_norm, want_res = REF.add_rms_norm(x, residual, w, 1e-6)
    got_norm, got_res = cpu_ops.add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    assert torch.equal(got_res, want_res)  # the add rounds as torch's does
    if dtype == torch.float32:
        torch.testing.assert_close(got_norm, want_norm, rtol=1e-6, atol=1e-6)
    else:
        assert bf16_ulps(got_norm, want_norm) <= 2


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_on_a_fused_qkv(cpu_ops, dtype):
    """q and k are views into one qkv row, as the model slices them; v is left alone."""
    from fleetserve.models.rotary import RotaryEmbedding

    torch.manual_seed(2)
    T, H, H_kv, D = 11, 9, 3, 64
    rotary = RotaryEmbedding(D, 2048, 10000.0, None)
    positions = torch.tensor([0, 1, 5, 17, 300, 2047, 3, 3, 9, 100, 1000])
    qkv = torch.randn(T, (H + 2 * H_kv) * D).to(dtype)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k = q.view(T, H, D), k.view(T, H_kv, D)
    want_q, want_k = REF.rope(q, k, REF.rope_state(positions, rotary.cos_sin_cache))
    v0 = v.clone()
    got_q, got_k = cpu_ops.rope(q, k, cpu_ops.rope_state(positions, rotary.cos_sin_cache))
    assert got_q.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(v, v0)
    if dtype == torch.float32:
        torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
    else:
        assert bf16_ulps(got_q, want_q) <= 1 and bf16_ulps(got_k, want_k) <= 1
        assert (got_q != want_q).float().mean() < 0.01


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64])
def test_silu_and_mul(cpu_ops, dtype, rows):
    torch.manual_seed(3)
    x = (torch.randn(rows, 2 * 1536) * 4).to(dtype)
    got = cpu_ops.silu_and_mul(x)
    want = REF.silu_and_mul(x)
    assert got.shape == (rows, 1536)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert bf16_ulps(got, want) <= 2  # a 1-step difference before the scaling
        assert (got != want).float().mean() < 0.01


@needs_kernel
def test_what_the_kernels_do_not_take_goes_to_the_reference(cpu_ops):
    x = torch.randn(4, 64).half()
    w = torch.ones(64).half()
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), REF.rms_norm(x, w, 1e-5))
    torch.testing.assert_close(cpu_ops.silu_and_mul(x), REF.silu_and_mul(x))
    strided = torch.randn(64, 4).t()  # rows not contiguous
    torch.testing.assert_close(
        cpu_ops.rms_norm(strided, torch.ones(64), 1e-5), REF.rms_norm(strided, torch.ones(64), 1e-5)
    )


@needs_kernel
def test_kernels_reject_bad_input():
    cache = torch.zeros(8, 16)
    q, k = torch.zeros(2, 2, 16), torch.zeros(2, 1, 16)
    with pytest.raises(RuntimeError, match="outside the rotary cache"):
        torch.ops.fleetserve.rotary_embedding(q, k, torch.tensor([0, 8]), cache)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        torch.ops.fleetserve.rms_norm(torch.empty(2, 16), torch.zeros(2, 16), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 2n\]"):
        torch.ops.fleetserve.silu_and_mul(torch.empty(2, 16), torch.zeros(2, 16))
