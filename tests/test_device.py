"""`--dtype auto` and `--attention-backend auto`: pure choices from what a device computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fleetserve.cpu import cpu_flags, cpu_model, describe
from fleetserve.engine.device import (
    Capabilities,
    checkpoint_dtype,
    choose_attention_backend,
    choose_dtype,
)

AVX2_ONLY = Capabilities("cpu", frozenset({"avx2", "fma", "avx"}))
AVX512_BF16 = Capabilities("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX = Capabilities("cpu", frozenset({"avx2", "amx_bf16", "amx_tile"}))


@pytest.mark.parametrize(
    ("checkpoint", "caps", "expected"),
    [
        ("bfloat16", AVX2_ONLY, "float32"),  # bf16 is emulated there: ~100x slower matmuls
        ("bfloat16", AVX512_BF16, "bfloat16"),
        ("bfloat16", AMX, "bfloat16"),
        ("float16", AVX512_BF16, "float32"),  # no avx512_fp16/amx_fp16
        ("float16", Capabilities("cpu", frozenset({"avx512_fp16"})), "float16"),
        ("float32", AVX512_BF16, "float32"),  # bf16 would be faster but change the tokens
        ("bfloat16", Capabilities("cpu"), "float32"),  # no flags known (not Linux)
        ("bfloat16", Capabilities("cuda", cuda_bf16=True), "bfloat16"),
        ("bfloat16", Capabilities("cuda", cuda_bf16=False), "float32"),
        ("float16", Capabilities("cuda"), "float16"),
        ("float32", Capabilities("cuda", cuda_bf16=True), "float32"),
    ],
)
def test_auto_dtype(checkpoint, caps, expected):
    dtype, why = choose_dtype("auto", checkpoint, caps)
    assert dtype == expected
    assert checkpoint in why


def test_auto_dtype_says_why_bf16_is_not_used():
    _, why = choose_dtype("auto", "bfloat16", AVX2_ONLY)
    assert "avx512_bf16" in why and "emulated" in why


@pytest.mark.parametrize("asked", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept(asked):
    assert choose_dtype(asked, "bfloat16", AVX2_ONLY) == (asked, "as asked")


def never_asked() -> str | None:
    raise AssertionError("this kernel is not needed for this choice")


def test_auto_backend_on_cuda_is_triton_when_it_imports():
    backend, why = choose_attention_backend("auto", torch.device("cuda"), never_asked, lambda: None)
    assert backend == "triton" and "Triton" in why


def test_auto_backend_on_cuda_falls_back_to_torch_and_says_why():
    choice = choose_attention_backend(
        "auto", torch.device("cuda"), never_asked, lambda: "no module named triton"
    )
    assert choice[0] == "torch" and "no module named triton" in choice[1]


def test_auto_backend_on_cpu_is_the_kernel_when_it_loads():
    choice = choose_attention_backend("auto", torch.device("cpu"), lambda: None, never_asked)
    assert choice[0] == "cpu"


def test_auto_backend_falls_back_to_torch_and_says_why():
    backend, why = choose_attention_backend(
        "auto", torch.device("cpu"), lambda: "no g++", never_asked
    )
    assert backend == "torch" and "no g++" in why


def test_an_explicit_backend_is_kept():
    choice = choose_attention_backend("torch", torch.device("cpu"), never_asked, never_asked)
    assert choice == ("torch", "as asked")
    choice = choose_attention_backend("triton", torch.device("cuda"), never_asked, never_asked)
    assert choice == ("triton", "as asked")


def test_checkpoint_dtype_reads_the_config_alone(tiny_llama, tmp_path):
    assert checkpoint_dtype(str(tiny_llama)) == "float32"
    assert checkpoint_dtype(str(tmp_path / "model.gguf")) == "float32"  # dequantized on load
    assert checkpoint_dtype(str(tmp_path)) is None  # no config.json: load_model says why


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu avx2 avx512f avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu avx2
"""


def test_cpu_flags_and_model_are_the_first_processors(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_flags(path) == "fpu avx2 avx512f avx512_bf16"
    assert cpu_model(path) == "AMD EPYC 9B14"


def test_describe_names_the_flags_that_decide_speed(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert describe(path).endswith("AMD EPYC 9B14; flags avx2 avx512f avx512_bf16 (no amx)")
    assert describe(tmp_path / "missing").endswith("unknown CPU; flags  (no amx)")


def test_cpu_flags_are_unknown_without_cpuinfo(tmp_path):
    assert cpu_flags(tmp_path / "missing") == ""
    assert cpu_model(tmp_path / "missing") is None


def test_one_module_reads_cpuinfo():
    """fleetserve.cpu is the one reader: the kernel's cache key, `--dtype auto` and profiles
    must agree on what this CPU is."""
    package = Path(__file__).resolve().parent.parent / "fleetserve"
    readers = {
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if 'Path("/proc/cpuinfo")' in p.read_text() or 'open("/proc/cpuinfo")' in p.read_text()
    }
    assert readers == {"cpu.py"}
