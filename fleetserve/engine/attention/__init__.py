"""Attention backends behind one small interface, chosen by name from a registry."""

from fleetserve.engine.attention import torch_ref as _torch_ref  # noqa: F401  (registers)
from fleetserve.engine.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    SeqSpec,
    build_attention_metadata,
    get_backend,
    register_backend,
)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "ForwardContext",
    "SeqSpec",
    "build_attention_metadata",
    "get_backend",
    "register_backend",
]
