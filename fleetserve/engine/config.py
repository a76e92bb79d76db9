"""Engine configuration: one frozen dataclass, validated once, with vLLM's argument names."""

from __future__ import annotations

from dataclasses import dataclass, fields

QUANTIZATIONS = (None, "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The attention backends' registry names (`fleetserve.attention`, which imports torch) and
# "auto": checked here so that a typo is a usage error, not an engine that fails to start.
ATTENTION_BACKEND_NAMES = ("auto", "cpu", "torch", "triton")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # default: the model's own
    dtype: str = "auto"
    max_model_len: int | None = None  # default: the model's, capped by what the KV cache holds
    kv_cache_memory: int | None = None  # bytes; default: a share of free memory
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    quantization: str | None = None
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    # "auto": the C++ kernel on CPU when it loads, Triton on CUDA when it imports, else torch
    attention_backend: str = "auto"
    enforce_eager: bool = False  # CUDA: no graphs for decode steps (CPU never uses graphs)
    num_threads: int | None = None  # CPU threads for torch; default: all cores

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name an HF folder or a .gguf file")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKEND_NAMES:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKEND_NAMES}, "
                f"got {self.attention_backend!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(
                f"kv_cache_memory must be a positive byte count, got {self.kv_cache_memory}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
