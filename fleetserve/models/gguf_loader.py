"""Reading llama.cpp GGUF files: config from the metadata, tensors dequantized to float32.

Tensor names are mapped to transformers' names so ``LlamaForCausalLM.load_weights`` serves
both formats. llama.cpp's converter permutes the rows of Llama Q and K weights (for its
interleaved RoPE); ``_reverse_permute`` undoes it exactly as transformers'
``LlamaTensorProcessor`` does. Qwen2/Qwen3 files are not permuted.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from fleetserve.models.config import ModelConfig
from fleetserve.models.registry import arch_for_gguf, get_arch_spec

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_PERMUTED_ARCHS = ("llama",)
ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)  # memory-maps the file


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    """``ModelConfig`` from GGUF metadata. ``torch_dtype`` is float32: tensors are dequantized.
    Biases and q/k norms are detected from the tensors present."""
    arch = _field(reader, "general.architecture")
    architecture = arch_for_gguf(arch)
    names = {t.name for t in reader.tensors}

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(
            f"GGUF: partial RoPE ({arch}.rope.dimension_count={rope_dim} < "
            f"head_dim {head_dim}) is not supported"
        )
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    spec = get_arch_spec(architecture)
    attention_bias = "blk.0.attn_q.bias" in names
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(_field(reader, f"{arch}.vocab_size", int(embd.shape[1]))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=attention_bias,
        o_proj_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names or spec.qk_norm,
        torch_dtype="float32",
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
    )


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:  # Llama 3.1+: per-frequency divisors, precomputed by the converter
        factors = dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        return {"rope_type": "freq_factors", "factors": tuple(float(f) for f in factors)}
    if kind == "none":
        return None
    if kind == "linear":
        return {
            "rope_type": "linear",
            "factor": float(_field(reader, f"{arch}.rope.scaling.factor")),
        }
    raise ValueError(
        f"GGUF: rope scaling type {kind!r} is not supported (supported: linear, Llama 3 rope_freqs)"
    )


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a GGUF tensor, or None if it has none (e.g. rope_freqs)."""
    m = _LAYER_RE.fullmatch(gguf_name)
    if m:
        layer, part, kind = m.groups()
        ours = _LAYER_NAMES.get(part)
        return None if ours is None else f"model.layers.{layer}.{ours}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    ours = _GLOBAL_NAMES.get(base)
    return None if ours is None else f"{ours}.{kind}"


def _reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp: w.reshape(n_head, 2, dim, ...).swapaxes(1, 2); this is its inverse.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iter_gguf_tensors(
    reader: gguf.GGUFReader, config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, float32 tensor) for every tensor of the model, dequantized one at a
    time. Raises ValueError on a tensor this loader does not know."""
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"GGUF tensor {t.name!r} is not supported by this loader")
        array = dequantize(t.data, t.tensor_type)
        with warnings.catch_warnings():  # F32 tensors are read-only memmaps; we only read them
            warnings.simplefilter("ignore", UserWarning)
            w = torch.from_numpy(np.asarray(array))
        if arch in _PERMUTED_ARCHS and ".attn_q." in t.name:
            w = _reverse_permute(w, config.num_attention_heads)
        elif arch in _PERMUTED_ARCHS and ".attn_k." in t.name:
            w = _reverse_permute(w, config.num_key_value_heads)
        yield name, w
