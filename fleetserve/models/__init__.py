"""Model definitions (Llama family) and checkpoint loading (HF safetensors folders, GGUF)."""

from fleetserve.models.config import ModelConfig
from fleetserve.models.loader import load_model, read_checkpoint, resolve_dtype
from fleetserve.models.quantization import Int8Linear
from fleetserve.models.registry import ARCHITECTURES
from fleetserve.models.tokenizer import load_tokenizer

__all__ = [
    "ARCHITECTURES",
    "Int8Linear",
    "ModelConfig",
    "load_model",
    "load_tokenizer",
    "read_checkpoint",
    "resolve_dtype",
]
