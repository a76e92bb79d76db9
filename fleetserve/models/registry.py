"""Supported architectures: one line each. Adding one is a model file (with its `ArchSpec`)
and a line here. Entries are imported on first use, so reading a config imports no model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetserve.registry import Registry

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: the module that implements it and how its configs read."""

    model_cls: type[nn.Module]
    qkv_bias: bool = False  # default of `attention_bias` when config.json does not say
    o_proj_bias_follows_qkv: bool = True  # Llama/Qwen3: attention_bias also on o_proj
    qk_norm: bool = False
    model_type: str | None = None  # config.json "model_type", used when "architectures" is absent
    gguf_arch: str | None = None  # `general.architecture` of GGUF files of this family


# Keys are HF class names (config.json "architectures").
ARCHITECTURES: Registry[ArchSpec] = Registry(
    "architecture",
    {
        "LlamaForCausalLM": "fleetserve.models.llama:LLAMA",
        "MistralForCausalLM": "fleetserve.models.llama:MISTRAL",
        "Qwen2ForCausalLM": "fleetserve.models.llama:QWEN2",
        "Qwen3ForCausalLM": "fleetserve.models.llama:QWEN3",
    },
)


def get_arch_spec(architecture: str) -> ArchSpec:
    """The spec of `architecture`; a `ValueError` naming the supported ones if unknown."""
    return ARCHITECTURES.get(architecture)


def arch_for_model_type(model_type: str | None) -> str | None:
    return next((n for n, s in ARCHITECTURES.items() if s.model_type == model_type), None)


def arch_for_gguf(gguf_arch: str) -> str:
    specs = dict(ARCHITECTURES.items())
    for name, spec in specs.items():
        if spec.gguf_arch == gguf_arch:
            return name
    supported = sorted(s.gguf_arch for s in specs.values() if s.gguf_arch)
    raise ValueError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {supported}")
