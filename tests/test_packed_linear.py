"""oneDNN-packed linear layers: the same numbers as F.linear, the same tokens as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checkpoints import prefill_in_chunks
from torch import nn

from fleetserve import LLM, SamplingParams
from fleetserve.models import load_model, loader
from fleetserve.models.packed_linear import PackedLinear, can_pack, pack_linears
from fleetserve.models.quantization import Int8Linear

pytestmark = pytest.mark.skipif(
    not can_pack(torch.empty(1, 1)), reason="this torch build has no oneDNN linear"
)
BF16 = pytest.mark.skipif(
    not can_pack(torch.empty(1, 1, dtype=torch.bfloat16)), reason="no native bf16 on this CPU"
)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_packed_linear_equals_f_linear(dtype, bias, rows):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(rows, 96, generator=g).to(dtype)
    expected = F.linear(x, linear.weight, linear.bias)
    packed = PackedLinear.from_linear(linear)
    got = packed(x)
    assert got.dtype == dtype and got.shape == (rows, 200)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    # a row's result does not depend on the rows beside it (decode batches change every step)
    torch.testing.assert_close(packed(x[:1]), got[:1], atol=0, rtol=0)


def test_can_pack_only_native_cpu_float():
    assert not can_pack(torch.empty(2, 2, dtype=torch.float16))
    assert not can_pack(torch.empty(2, 2, dtype=torch.int8))
    assert not can_pack(torch.empty(2, 2, device="meta"))


def test_pack_linears_swaps_every_float_linear(tiny_checkpoints):
    plain, config = load_model(tiny_checkpoints["llama_tied_rope3"], packed=False)
    model, _ = load_model(tiny_checkpoints["llama_tied_rope3"])
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 4 * config.num_hidden_layers and plain.lm_head is None
    assert len(packed) == len(linears) + 1  # and the tied lm_head
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    assert pack_linears(model) == 0  # nothing left to pack


def test_pack_linears_leaves_int8_alone(tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints["qwen2"], quantization="int8")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int8Linear)
    assert isinstance(layer.mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, PackedLinear)  # the float lm_head is packed


@pytest.mark.parametrize("arch", ["llama", "llama_tied_rope3", "qwen2", "qwen3"])
def test_packed_model_matches_reference_forward(arch, tiny_checkpoints):
    ids = torch.randint(3, 512, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    plain, config = load_model(tiny_checkpoints[arch], packed=False)
    model, _ = load_model(tiny_checkpoints[arch])
    expected = prefill_in_chunks(plain, config, ids, [20, 17])
    got = prefill_in_chunks(model, config, ids, [20, 17])
    assert expected.std() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=BF16)])
def test_packed_engine_is_token_exact(tiny_llama, dtype, monkeypatch):
    """The engine's greedy tokens with packed linears equal those with plain F.linear."""
    prompts = [[5, 17, 42, 99, 3], [7] * 30, list(range(40, 90))]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def generate(expect_packed: bool) -> list[list[int]]:
        llm = LLM(str(tiny_llama), dtype=dtype)
        down_proj = llm.engine.runner.model.model.layers[0].mlp.down_proj
        assert isinstance(down_proj, PackedLinear) == expect_packed
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    packed = generate(expect_packed=True)
    monkeypatch.setattr(loader, "pack_linears", lambda model: 0)
    plain = generate(expect_packed=False)
    assert packed == plain


def test_packing_frees_each_float_weight_as_it_goes():
    # Holding the modules to pack kept every float weight alive until the end: the peak was
    # all float weights plus all packed copies.
    import weakref

    from fleetserve.models import packed_linear

    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
    weights = [weakref.ref(m.weight) for m in model]
    alive_while_packing = []
    real = PackedLinear.from_linear

    def watch(linear):
        alive_while_packing.append(sum(w() is not None for w in weights))
        return real(linear)

    packed_linear.PackedLinear.from_linear = staticmethod(watch)
    try:
        assert pack_linears(model) == 4
    finally:
        packed_linear.PackedLinear.from_linear = real
    assert alive_while_packing == [4, 3, 2, 1]  # the earlier ones are gone already
