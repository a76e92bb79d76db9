"""fleetserve: datacenter-scale inference serving in plain, readable Python."""

from typing import TYPE_CHECKING

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from fleetserve.engine.llm import LLM
    from fleetserve.engine.outputs import CompletionOutput, RequestOutput
    from fleetserve.engine.sampling_params import SamplingParams

_LAZY = {
    "LLM": "fleetserve.engine.llm",
    "SamplingParams": "fleetserve.engine.sampling_params",
    "RequestOutput": "fleetserve.engine.outputs",
    "CompletionOutput": "fleetserve.engine.outputs",
}


def __getattr__(name: str):
    # Lazy, so that `fleetserve bench` and the gateway never import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fleetserve' has no attribute {name!r}")
