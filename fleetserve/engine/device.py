"""Everything device-specific in one place: which device, which dtype, which attention
backend, how much memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fleetserve.cpu import cpu_flags

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


@dataclass(frozen=True)
class Capabilities:
    """What a device computes natively, as `choose_dtype` needs it."""

    device_type: str  # "cpu" | "cuda"
    cpu_flags: frozenset[str] = frozenset()  # /proc/cpuinfo flags
    cuda_bf16: bool = False


# A CPU with one of these runs bf16 (fp16) matmuls in hardware; without, torch emulates them,
# ~100x slower than fp32 on an AVX2-only EPYC (0.9 against 127 GFLOPS on two cores).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")


def capabilities(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        return Capabilities("cuda", cuda_bf16=torch.cuda.is_bf16_supported())
    return Capabilities("cpu", frozenset(cpu_flags().split()))


def choose_dtype(requested: str, checkpoint: str, caps: Capabilities) -> tuple[str, str]:
    """(dtype, why) for `--dtype requested` and a checkpoint stored in `checkpoint`
    ("float32" | "bfloat16" | "float16").

    "auto" keeps the checkpoint's dtype where the device computes it natively, and goes up to
    float32 where it does not: float32 holds every bf16/fp16 value exactly, so the answers stay
    those of the checkpoint. A float32 checkpoint stays float32 (lower precision would change
    the tokens)."""
    if requested != "auto":
        return requested, "as asked"
    if checkpoint == "float32":
        return "float32", "the checkpoint is float32"
    if caps.device_type == "cuda":
        if checkpoint == "bfloat16" and not caps.cuda_bf16:
            return "float32", "the checkpoint is bfloat16, but this GPU has no bf16"
        return checkpoint, f"the checkpoint is {checkpoint} and this GPU computes it natively"
    native = CPU_BF16_FLAGS if checkpoint == "bfloat16" else CPU_FP16_FLAGS
    present = [f for f in native if f in caps.cpu_flags]
    if present:
        return checkpoint, f"the checkpoint is {checkpoint} and this CPU has {present[0]}"
    return "float32", (
        f"the checkpoint is {checkpoint}, but this CPU has no {'/'.join(native)} "
        f"({checkpoint} is emulated, float32 is faster and exact)"
    )


def checkpoint_dtype(path: str) -> str | None:
    """The dtype the checkpoint stores, from its config alone (no tensors read): a GGUF's
    tensors are dequantized to float32. None when unreadable: `load_model` says why."""
    from fleetserve.models.config import ModelConfig

    p = Path(path)
    if p.suffix == ".gguf":
        return "float32"
    try:
        return ModelConfig.from_hf_folder(p).torch_dtype
    except (OSError, ValueError):
        return None


def choose_attention_backend(
    requested: str,
    device: torch.device,
    kernel_problem: Callable[[], str | None],
    triton_problem: Callable[[], str | None],
) -> tuple[str, str]:
    """(backend name, why): "auto" is the C++ kernel ("cpu") on a CPU where it builds and
    loads, the Triton kernel ("triton") on CUDA where triton imports, else the torch
    reference. `kernel_problem()` / `triton_problem()` (asked only for their device) say why
    that kernel cannot run, or None (`cpu_extension.available`, `triton_paged.problem`)."""
    if requested != "auto":
        return requested, "as asked"
    if device.type == "cuda":
        problem = triton_problem()
        if problem is not None:
            return "torch", f"the Triton kernel is unavailable: {problem}"
        return "triton", "the Triton paged-attention kernel (triton imports, CUDA device)"
    if device.type != "cpu":
        return "torch", f"no paged-attention kernel for {device.type}"
    problem = kernel_problem()
    if problem is not None:
        return "torch", f"the C++ kernel is unavailable: {problem}"
    return "cpu", "the C++ paged-attention kernel loaded"


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


if __name__ == "__main__":
    # For benchmark scripts, which run every engine in the dtype fleetserve would choose:
    #   python -m fleetserve.engine.device MODEL  ->  the dtype on stdout, the reason on stderr
    import sys

    stored = checkpoint_dtype(sys.argv[1])
    if stored is None:
        sys.exit(f"cannot read the config of {sys.argv[1]}")
    chosen, reason = choose_dtype("auto", stored, capabilities(torch.device("cpu")))
    print(chosen)
    print(f"dtype auto -> {chosen}: {reason}", file=sys.stderr)
