"""Everything device-specific in one place: which device, which dtype, how much memory."""

from __future__ import annotations

import torch

CPU_KV_CACHE_SHARE = 0.25  # of available host memory
CPU_KV_CACHE_MAX = 2 * 2**30
GPU_KV_CACHE_SHARE = 0.85  # of free device memory after the weights are loaded


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def kv_dtype(model: torch.nn.Module) -> torch.dtype:
    """The KV cache stores activations, so it follows the model's activation dtype (an int8
    weight-only model still computes in its float dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def default_kv_cache_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_CACHE_SHARE)
    return int(min(_available_host_memory() * CPU_KV_CACHE_SHARE, CPU_KV_CACHE_MAX))


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30
