"""Supported architectures: one line each. Adding one is a model file and a line here."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fleetserve.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class ArchSpec:
    model_cls: type[nn.Module]
    qkv_bias: bool = False  # default of `attention_bias` when config.json does not say
    o_proj_bias_follows_qkv: bool = True  # Llama/Qwen3: attention_bias also on o_proj
    qk_norm: bool = False
    model_type: str | None = None  # config.json "model_type", used when "architectures" is absent
    gguf_arch: str | None = None  # `general.architecture` of GGUF files of this family


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(LlamaForCausalLM, model_type="llama", gguf_arch="llama"),
    # llama.cpp writes Mistral models as "llama" GGUFs
    "MistralForCausalLM": ArchSpec(LlamaForCausalLM, model_type="mistral"),
    "Qwen2ForCausalLM": ArchSpec(
        LlamaForCausalLM,
        qkv_bias=True,
        o_proj_bias_follows_qkv=False,
        model_type="qwen2",
        gguf_arch="qwen2",
    ),
    "Qwen3ForCausalLM": ArchSpec(
        LlamaForCausalLM, qk_norm=True, model_type="qwen3", gguf_arch="qwen3"
    ),
}


def get_arch_spec(architecture: str) -> ArchSpec:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture]


def arch_for_model_type(model_type: str | None) -> str | None:
    return next((n for n, s in ARCHITECTURES.items() if s.model_type == model_type), None)


def arch_for_gguf(gguf_arch: str) -> str:
    for name, spec in ARCHITECTURES.items():
        if spec.gguf_arch == gguf_arch:
            return name
    supported = sorted(s.gguf_arch for s in ARCHITECTURES.values() if s.gguf_arch)
    raise ValueError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {supported}")
