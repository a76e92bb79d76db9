"""int8 dynamic quantization of a model's Linear layers: a rewrite after loading, the model
code untouched. Weights are int8 per output channel (per tensor, torch's default, cost
all-MiniLM-L6-v2 twice the cosine distance here); activations are quantized per
batch at run time. Its accuracy cost is measured by `benchmarks/predict.py --int8-accuracy`."""

from __future__ import annotations

import warnings

import torch


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every `nn.Linear` replaced by its dynamic int8 version."""
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError("int8 quantization needs an eager module, not TorchScript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao is deprecated for torchao
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(
            module, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
