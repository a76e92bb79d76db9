"""Weight-only int8: close to float32, ~4x less linear-weight memory, both forward paths."""

from __future__ import annotations

import pytest
import torch
from checkpoints import TINY_ARCHS, prefill_in_chunks
from torch import nn

from fleetserve.models import Int8Linear, load_model


def _linear_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.model.layers.modules():
        if isinstance(m, (nn.Linear, Int8Linear)):
            tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_int8_close_to_fp32(arch, tiny_checkpoints):
    ids = torch.randint(3, 512, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    fp32, config = load_model(tiny_checkpoints[arch])
    int8, _ = load_model(tiny_checkpoints[arch], quantization="int8")
    expected = prefill_in_chunks(fp32, config, ids, [len(ids)])
    logits = prefill_in_chunks(int8, config, ids, [30, 15])
    # Per-channel int8 moves each weight by <= 0.4% of its row's max; through two random
    # layers that stays a few percent of the logits' spread (measured 0.16-0.25 / std 2.4).
    assert (logits - expected).abs().max() < 0.15 * expected.std()
    assert _kl(expected, logits) < 5e-3  # measured 4e-4 - 7e-4


def test_int8_swaps_decoder_linears_only(tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints["qwen2"], quantization="int8")
    layer = model.model.layers[0]
    for m in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        assert isinstance(m, Int8Linear) and m.weight.dtype == torch.int8
    assert layer.self_attn.qkv_proj.bias is not None  # Qwen2's q/k/v bias survives
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_int8_memory(tiny_checkpoints):
    fp32, _ = load_model(tiny_checkpoints["llama"], packed=False)  # plain nn.Linear weights
    int8, _ = load_model(tiny_checkpoints["llama"], quantization="int8")
    ratio = _linear_bytes(fp32) / _linear_bytes(int8)
    # 4 bytes -> 1 byte per weight, plus one fp32 scale per output row: 4 * K / (K + 4)
    assert 3.7 < ratio <= 4.0, ratio


def test_int8_bf16_runs(tiny_checkpoints):
    ids = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    fp32, config = load_model(tiny_checkpoints["llama"])
    model, _ = load_model(tiny_checkpoints["llama"], dtype="bfloat16", quantization="int8")
    assert model.model.layers[0].mlp.down_proj.scale.dtype == torch.bfloat16
    expected = prefill_in_chunks(fp32, config, ids, [len(ids)])
    # 1-token chunks take the CPU int8 x bf16 kernel; the 16-token chunk converts + matmuls
    logits = prefill_in_chunks(model, config, ids, [1, 1, 1, 1, 16])
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 0.25 * expected.std()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int8_linear_matches_dequantized(dtype, rows):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 40, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=g))
        linear.weight[3] = 0  # an all-zero row must not divide by zero
    q = Int8Linear.from_linear(linear)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    dequant = q.weight.float() * q.scale.float()[:, None]
    expected = x.float() @ dequant.T + linear.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(q(x).float(), expected, atol=tol * 10, rtol=tol)
    assert (dequant - linear.weight.float()).abs().max() <= q.scale.float().max() / 2 + 1e-6
    assert torch.isfinite(q.scale).all() and (q.weight[3] == 0).all()
