"""Tiny random checkpoints for tests, built offline in a second and deterministic (seeded).

``build_tiny_checkpoints(folder)`` writes one HF folder per architecture (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json), fp32,
hidden 64, 2 layers, 4 heads, 2 KV heads, vocab = the tokenizer's 512 tokens. Weights are drawn
wider than transformers' init (std 0.1, 0.3 for embeddings, norms around 1, non-zero biases)
so that logits are spread out (std ~2: greedy decoding does not hinge on 1e-6 differences)
and every tensor matters.

``write_gguf(hf_folder, path)`` converts one of them to an F32 GGUF file the way llama.cpp's
converter does (tensor names from ``gguf``'s name map, Q/K rows permuted for Llama).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS_TOKEN_ID = 2  # <|im_end|>, as in SmolLM2-Instruct
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part over new sound take "
    "only little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any "
    "same tell boy follow came want show also around form three small set put end does another "
    "well large must big even such because turn here why ask went men read need land different "
    "home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should world high every near add food "
    "between own below country plant last school father keep tree never start city earth eye "
    "light thought head under story saw left few while along might close something seem next "
    "hard open example begin life always those both paper together got group often run server "
    "model token request batch cache block queue user assistant system hello capital France "
    "Paris question answer what is the of a model runs fast on a laptop and on a GPU"
)
_WORDS = _TEXT.split()

TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "LlamaForCausalLM", "model_type": "llama"},
    "llama_tied_rope3": {
        "arch": "LlamaForCausalLM",
        "model_type": "llama",
        "tie_word_embeddings": True,
        # original context 64 puts the 8 frequencies of head_dim 16 in all three llama3 bands
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {"arch": "MistralForCausalLM", "model_type": "mistral", "sliding_window": None},
    "qwen2": {"arch": "Qwen2ForCausalLM", "model_type": "qwen2"},  # q/k/v bias
    "qwen3": {"arch": "Qwen3ForCausalLM", "model_type": "qwen3", "head_dim": 32},  # q/k norm
}


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.2:
            sentence = f"<|im_start|>{rng.choice(['user', 'assistant', 'system'])}\n{sentence}"
        out.append(sentence + f" {rng.randint(0, 2026)}")
    return out


def build_tokenizer(folder: Path) -> None:
    """Byte-level BPE (512 tokens) trained on a generated corpus; saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    hf.save_pretrained(folder)


def _hf_config(name: str, vocab_size: int):
    from transformers import AutoConfig

    spec = dict(TINY_ARCHS[name])
    arch, model_type = spec.pop("arch"), spec.pop("model_type")
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": 0,
        "architectures": [arch],
    }
    kwargs.update(spec)
    return AutoConfig.for_model(model_type, **kwargs)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.3 * noise)  # logits with std ~2.4
            else:
                p.copy_(0.1 * noise)  # weights and biases


def build_checkpoint(name: str, folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """One tiny HF folder for ``name`` in TINY_ARCHS, with the tokenizer files copied in."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    config = _hf_config(name, tok.get_vocab_size(with_added_tokens=True))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=EOS_TOKEN_ID, pad_token_id=0
    )
    model.save_pretrained(folder)
    for f in tokenizer_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def build_tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Every architecture of TINY_ARCHS under ``root``; name -> folder."""
    tokenizer_folder = root / "_tokenizer"
    build_tokenizer(tokenizer_folder)
    return {
        name: build_checkpoint(name, root / name, tokenizer_folder, seed=i)
        for i, name in enumerate(TINY_ARCHS)
    }


def with_context(model: Path, folder: Path, positions: int) -> Path:
    """A copy of the HF folder `model` at `folder` whose config allows `positions` positions
    (rotary positions: the same weights run any length). A tiny model decodes its 512
    positions in well under a second: tests that need a stream to outlast something (a kill,
    a drain, a client's timeout) serve a longer one. The folder's name is the served name."""
    import shutil

    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _llama_cpp_permute(w, n_head: int):
    # convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama3_rope_freqs(cfg: dict[str, Any], head_dim: int) -> list[float]:
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    import math

    rope = cfg["rope_parameters"]
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def write_gguf(hf_folder: Path, path: Path) -> Path:
    """An F32 GGUF of a tiny HF folder, as llama.cpp's converter would write it."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    arch = {
        "llama": gguf.MODEL_ARCH.LLAMA,
        "mistral": gguf.MODEL_ARCH.LLAMA,
        "qwen2": gguf.MODEL_ARCH.QWEN2,
        "qwen3": gguf.MODEL_ARCH.QWEN3,
    }[cfg["model_type"]]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    name_map = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    if cfg["rope_parameters"].get("rope_type") == "llama3":
        factors = np.array(_llama3_rope_freqs(cfg, head_dim), dtype=np.float32)
        writer.add_tensor("rope_freqs.weight", factors)
    for name, w in load_file(hf_folder / "model.safetensors").items():
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(w, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(w, kv_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def new_kv_caches(config, num_blocks: int, block_size: int, dtype=torch.float32, backend=None):
    """Zeroed paged KV cache, one tensor per layer, shaped as the backend (default "torch")
    wants it."""
    from fleetserve.attention import get_backend

    backend = backend or get_backend("torch")
    return [
        backend.new_kv_cache(
            num_blocks, block_size, config.num_key_value_heads, config.head_dim, dtype
        )
        for _ in range(config.num_hidden_layers)
    ]


def prefill_in_chunks(
    model, config, token_ids: list[int], chunk_sizes: list[int], block_size: int = 16
) -> torch.Tensor:
    """Runs one sequence through a fleetserve model chunk by chunk (later chunks read the
    earlier ones from the paged cache, torch backend); returns float32 logits (T, vocab)."""
    from fleetserve.attention import (
        ForwardContext,
        SeqSpec,
        build_attention_metadata,
        get_backend,
    )

    assert sum(chunk_sizes) == len(token_ids)
    num_blocks = -(-len(token_ids) // block_size)
    # blocks in reverse order, so a wrong block table cannot pass by accident
    block_ids = list(range(num_blocks))[::-1]
    backend, logits, done = get_backend("torch"), [], 0
    kv = new_kv_caches(config, num_blocks, block_size, next(model.parameters()).dtype, backend)
    with torch.no_grad():
        for n in chunk_sizes:
            meta = build_attention_metadata([SeqSpec(done, n, block_ids)], block_size)
            ids = torch.tensor(token_ids[done : done + n])
            hidden = model(ids, torch.arange(done, done + n), ForwardContext(meta, kv, backend))
            logits.append(model.compute_logits(hidden))
            done += n
    return torch.cat(logits)
