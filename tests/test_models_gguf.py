"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers' own GGUF
loading: both dequantize to float32, so logits agree to ~1e-4 and greedy tokens are equal."""

from __future__ import annotations

import pytest
import torch
from checkpoints import new_kv_caches, prefill_in_chunks
from torch import nn

from fleetserve.attention import (
    ForwardContext,
    SeqSpec,
    build_attention_metadata,
    get_backend,
)
from fleetserve.models import Int8Linear, load_model, load_tokenizer
from fleetserve.models.packed_linear import PackedLinear

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    model, config = load_model(smollm2_gguf)
    return model, config


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


def _greedy(model: nn.Module, config, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Prefill, then one decode step per token through the paged cache."""
    block_size, backend = 16, get_backend("torch")
    blocks = list(range(-(-(len(prompt) + max_new_tokens) // block_size)))
    kv = new_kv_caches(config, len(blocks), block_size)
    out: list[int] = []
    with torch.no_grad():
        meta = build_attention_metadata([SeqSpec(0, len(prompt), blocks)], block_size)
        hidden = model(
            torch.tensor(prompt), torch.arange(len(prompt)), ForwardContext(meta, kv, backend)
        )
        for _ in range(max_new_tokens):
            out.append(int(model.compute_logits(hidden[-1:]).argmax()))
            pos = len(prompt) + len(out) - 1
            meta = build_attention_metadata([SeqSpec(pos, 1, blocks)], block_size)
            hidden = model(
                torch.tensor(out[-1:]), torch.tensor([pos]), ForwardContext(meta, kv, backend)
            )
    return out


def test_smollm2_config(smollm2):
    _, config = smollm2
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)
    assert config.rope_theta == 100000.0 and config.max_position_embeddings == 8192


def test_smollm2_tokenizer(tokenizer, prompt_ids):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    text = tokenizer.decode(prompt_ids)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow  # transformers' GGUF loader alone takes ~13 s here
def test_smollm2_matches_transformers(smollm2, smollm2_gguf, prompt_ids):
    from transformers import AutoModelForCausalLM

    model, config = smollm2
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with torch.no_grad():
        expected = ref(torch.tensor([prompt_ids])).logits[0].float()
    logits = prefill_in_chunks(model, config, prompt_ids, [len(prompt_ids)])
    assert (logits - expected).abs().max() < 1e-3  # measured 7.4e-5 (logits std ~7)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))

    ours = _greedy(model, config, prompt_ids, 8)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    assert ours == theirs[0, len(prompt_ids) :].tolist()


def test_smollm2_answers(smollm2, tokenizer, prompt_ids):
    model, config = smollm2
    answer = tokenizer.decode(_greedy(model, config, prompt_ids, 8))
    assert "Paris" in answer


def test_smollm2_int8(smollm2, smollm2_gguf, prompt_ids):
    fp32, config = smollm2
    int8, _ = load_model(smollm2_gguf, quantization="int8")
    expected = prefill_in_chunks(fp32, config, prompt_ids, [len(prompt_ids)])
    logits = prefill_in_chunks(int8, config, prompt_ids, [len(prompt_ids)])
    p, q = expected.log_softmax(-1), logits.log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean() < 0.02  # measured ~0.006; bf16 is similar
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9

    def linear_bytes(model: nn.Module) -> int:
        return sum(
            t.numel() * t.element_size()
            for m in model.model.layers.modules()
            if isinstance(m, (nn.Linear, PackedLinear, Int8Linear))
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        )

    assert linear_bytes(fp32) / linear_bytes(int8) > 3.9
