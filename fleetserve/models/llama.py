"""The Llama family in one file: Llama 2/3, SmolLM, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Differences between the members are flags on ``ModelConfig``. The forward takes a flattened
batch (no batch dim): ``input_ids, positions: (num_tokens,)``. Attention goes through
``ctx.backend``, which also writes the step's K/V into ``ctx.kv_caches[layer]``; the norms,
RoPE and SiLU through ``ctx.backend.ops`` (the torch reference, or fused kernels). Layers pass
``(hidden, residual)`` on, vLLM's way, so that each residual add fuses into the next norm.

Module and parameter names follow transformers' (``model.layers.N.self_attn...``) so that HF
tensor names map one-to-one, except the fused ``qkv_proj`` and ``gate_up_proj``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.models.layers import MergedLinear, RMSNorm
from fleetserve.models.registry import ArchSpec
from fleetserve.models.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from fleetserve.attention.base import ForwardContext
    from fleetserve.attention.ops import TorchOps
    from fleetserve.models.config import ModelConfig

logger = logging.getLogger(__name__)

# checkpoint shard name -> (our fused module, shard index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.head_dim**-0.5
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            bias=config.attention_bias,
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: Any, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.backend.ops.rope(q, k, rope)
        o = ctx.backend.forward(
            q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn_metadata, self.scale
        )  # [T, H, D]
        return self.o_proj(o.reshape(T, self.q_size))  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = MergedLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False
        )
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))  # [T, 2I] -> [T, I]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: Any, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's MLP output, the residual stream before it); the
        stream itself is residual + x. The first layer gets residual None."""
        ops = ctx.backend.ops
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual, x = x, ops.rms_norm(x, norm1.weight, norm1.eps)
        else:
            x, residual = ops.add_rms_norm(x, residual, norm1.weight, norm1.eps)
        x = self.self_attn(x, rope, ctx)
        x, residual = ops.add_rms_norm(x, residual, norm2.weight, norm2.eps)
        return self.mlp(x, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        ops = ctx.backend.ops
        x, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        rope = ops.rope_state(positions, self.rotary_emb.cos_sin_cache)  # shared by all layers
        for layer in self.layers:
            x, residual = layer(x, residual, rope, ctx)
        if residual is None:  # no layers
            return ops.rms_norm(x, self.norm.weight, self.norm.eps)
        return ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied: compute_logits reads embed_tokens.weight; no second module shares the Parameter
        # (sharing does not survive ``to_empty`` from the meta device).
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) -> hidden states (num_tokens, hidden_size).
        Writes this step's K/V into ``ctx.kv_caches``; reads nothing else from outside."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """hidden: (n, hidden_size) -> (n, vocab_size), float32 (or, with ``float32=False``,
        the model's dtype: the sampler widens only where it needs to). An ``lm_head`` may be
        any module that maps hidden states to logits (``pack_linears`` gives a tied model
        one)."""
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def init_buffers(self, device: torch.device) -> None:
        self.model.rotary_emb.init_buffers(device)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors named as transformers names them (``model.layers.0.
        self_attn.q_proj.weight``) into this model, fusing q/k/v and gate/up. Copies convert
        dtype and device. Raises ValueError if a parameter is missing or a shape differs."""
        params = dict(self.named_parameters())
        expected = {(n, None) for n in params}
        for name in params:
            module = self.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, MergedLinear):
                expected.discard((name, None))
                expected |= {(name, i) for i in range(len(module.output_sizes))}
        loaded: set[tuple[str, int | None]] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue  # recomputed / tied to embed_tokens
            target, shard = _fused_target(name)
            if target not in params:
                unexpected.append(name)
                continue
            param = params[target]
            if shard is not None:
                module = self.get_submodule(target.rsplit(".", 1)[0])
                module.load_shard(param, shard, tensor)
            else:
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor {name}: shape {tuple(tensor.shape)} != expected "
                        f"{tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
            loaded.add((target, shard))
        if unexpected:
            logger.warning(
                "ignored %d checkpoint tensors not in the model: %s",
                len(unexpected),
                unexpected[:8],
            )
        missing = sorted(
            f"{n}" + ("" if s is None else f"[shard {s}]") for n, s in expected - loaded
        )
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:8]}")


def _fused_target(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in STACKED_PARAMS:
        fused, shard = STACKED_PARAMS[parts[-2]]
        return ".".join([*parts[:-2], fused, parts[-1]]), shard
    return name, None


# The family's members, by how their configs differ (see `models/registry.py`).
LLAMA = ArchSpec(LlamaForCausalLM, model_type="llama", gguf_arch="llama")
MISTRAL = ArchSpec(LlamaForCausalLM, model_type="mistral")  # llama.cpp writes "llama" GGUFs
QWEN2 = ArchSpec(
    LlamaForCausalLM,
    qkv_bias=True,
    o_proj_bias_follows_qkv=False,
    model_type="qwen2",
    gguf_arch="qwen2",
)
QWEN3 = ArchSpec(LlamaForCausalLM, qk_norm=True, model_type="qwen3", gguf_arch="qwen3")
