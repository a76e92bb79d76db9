"""``ModelConfig``: the one description of a decoder model that the rest of fleetserve reads.

Parsed from an HF folder (``config.json`` + optional ``generation_config.json``) here, or from
GGUF metadata in ``gguf_loader.py``; validated once in ``__post_init__``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from fleetserve.models.registry import ARCHITECTURES, arch_for_model_type, get_arch_spec

logger = logging.getLogger(__name__)

# RoPE variants the model implements; "freq_factors" is llama.cpp's per-frequency divisor
# tensor (``rope_freqs.weight``), which GGUF files carry instead of Llama 3's parameters.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None, or {"rope_type": ..., params}; see SUPPORTED
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2: always)
    qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    torch_dtype: str  # the checkpoint's dtype: "float32" | "bfloat16" | "float16"
    eos_token_ids: tuple[int, ...]
    o_proj_bias: bool = False  # Llama/Qwen3 put `attention_bias` on o_proj too; Qwen2 does not
    bos_token_id: int | None = None
    # Mistral v0.1 style local attention. Not applied by the model: it is exact only while a
    # sequence is no longer than this; the engine should cap max_model_len to it.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        ARCHITECTURES.check(self.architecture)  # a ValueError naming the supported ones
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.torch_dtype not in _DTYPES:
            raise ValueError(
                f"ModelConfig.torch_dtype must be one of {_DTYPES}, got {self.torch_dtype!r}"
            )
        _check_rope_scaling(self.rope_scaling, self.head_dim)
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"ModelConfig.eos_token_ids: {t} is outside the vocabulary "
                    f"(vocab_size {self.vocab_size})"
                )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be > 0, got {self.sliding_window}")

    @cached_property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> ModelConfig:
        """Reads ``config.json`` and, if present, ``generation_config.json`` (for EOS ids)."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{folder} has no config.json; an HF model folder holds config.json and "
                "model.safetensors (or model-0000x-of-0000y.safetensors + "
                "model.safetensors.index.json)"
            )
        cfg = json.loads(config_path.read_text())
        gen_path = folder / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_hf_dict(cfg, gen)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], gen: dict[str, Any] | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs and arch_for_model_type(cfg.get("model_type")):
            archs = [arch_for_model_type(cfg.get("model_type"))]
        if len(archs) != 1:
            raise ValueError(
                f"config.json: 'architectures' must name exactly one class, got {archs!r}"
            )
        arch = archs[0]
        spec = get_arch_spec(arch)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')"
            )
        if cfg.get("mlp_bias", False):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if cfg.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        rope_theta, rope_scaling = _parse_rope(cfg)
        hidden, heads = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
        attention_bias = bool(cfg.get("attention_bias", spec.qkv_bias))
        eos = _eos_ids((gen or {}).get("eos_token_id")) + _eos_ids(cfg.get("eos_token_id"))
        return cls(
            architecture=arch,
            vocab_size=_req(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req(cfg, "intermediate_size"),
            num_hidden_layers=_req(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            max_position_embeddings=_req(cfg, "max_position_embeddings"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias and spec.o_proj_bias_follows_qkv,
            qk_norm=spec.qk_norm,
            torch_dtype=_dtype_name(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            eos_token_ids=tuple(dict.fromkeys(eos)),  # dedupe, keep order
            bos_token_id=cfg.get("bos_token_id"),
            sliding_window=_sliding_window(cfg),
        )


def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ValueError(f"config.json: missing required field {key!r}")
    return cfg[key]


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _dtype_name(value: str) -> str:
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(
            f"config.json: dtype {value!r} is not supported; expected one of {_DTYPES}"
        )
    return name


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    # Qwen2/Qwen3 configs carry a window that `use_sliding_window: false` switches off.
    if not cfg.get("use_sliding_window", True):
        return None
    if window is None or window >= cfg.get("max_position_embeddings", 0):
        return None
    logger.warning(
        "sliding_window=%d is not applied: outputs are exact only for sequences up to %d tokens",
        window,
        window,
    )
    return int(window)


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Both layouts: transformers 5 ``rope_parameters`` (theta inside) and the older top-level
    ``rope_theta`` + ``rope_scaling`` (type under "type" or "rope_type")."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _check_rope_scaling(rope_scaling: dict[str, Any] | None, head_dim: int) -> None:
    if rope_scaling is None:
        return
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"ModelConfig.rope_scaling: rope_type {rope_type!r} is not supported; supported: "
            f"{list(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("ModelConfig.rope_scaling: partial_rotary_factor != 1 is not supported")
    needed = {"linear": ("factor",), "llama3": _LLAMA3_KEYS, "freq_factors": ("factors",)}
    for key in needed.get(rope_type, ()):
        if key not in rope_scaling:
            raise ValueError(f"ModelConfig.rope_scaling: rope_type {rope_type!r} needs {key!r}")
    if rope_type == "freq_factors" and len(rope_scaling["factors"]) != head_dim // 2:
        raise ValueError("ModelConfig.rope_scaling: 'factors' must have head_dim // 2 entries")
