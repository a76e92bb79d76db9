"""Attention backends behind one small interface, chosen by name from a registry.

It sits below both `models/` (whose forward calls `ctx.backend`) and `engine/` (whose model
runner builds the metadata and the KV caches), so that neither has to import the other.
"""

from fleetserve.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    SeqSpec,
    build_attention_metadata,
)
from fleetserve.registry import Registry

ATTENTION_BACKENDS: Registry[type[AttentionBackend]] = Registry(
    "attention backend",
    {
        "torch": "fleetserve.attention.torch_ref:TorchAttention",
        "cpu": "fleetserve.attention.cpu_paged:CpuPagedAttention",
        "triton": "fleetserve.attention.triton_paged:TritonPagedAttention",
    },
)


def get_backend(name: str) -> AttentionBackend:
    """A new backend of the registered name; a `ValueError` naming the choices if unknown."""
    return ATTENTION_BACKENDS.get(name)()


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "ForwardContext",
    "SeqSpec",
    "build_attention_metadata",
    "get_backend",
]
