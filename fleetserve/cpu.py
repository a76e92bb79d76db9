"""What this machine's CPU is, from /proc/cpuinfo: the one reader of it, for the kernel's cache
key (attention/), `--dtype auto` (engine/), profiles (perf/) and benchmarks. Torch-free and
importing nothing of fleetserve, so that every layer may use it."""

from __future__ import annotations

import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _field(name: str, cpuinfo: Path) -> str | None:
    """The value of the first `name : value` line ("flags", "model name"); None where the file
    or the line is missing (not Linux, some containers)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = CPUINFO) -> str:
    """The first processor's flags, space-separated ("" where unknown)."""
    return _field("flags", cpuinfo) or ""


def cpu_model(cpuinfo: Path = CPUINFO) -> str | None:
    """The first processor's model name, e.g. "AMD EPYC 9B14"; None where unknown."""
    return _field("model name", cpuinfo)


# The flags that decide this project's speed: vector width, native bf16, int8 dot products.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
               "amx_bf16")  # fmt: skip


def describe(cpuinfo: Path = CPUINFO) -> str:
    """One line to print beside a benchmark figure: cores, model and the flags that matter,
    e.g. "2 cores AMD EPYC 9B14; flags avx2 fma avx512f ... avx512_bf16 (no amx)"."""
    flags = set(cpu_flags(cpuinfo).split())
    have = " ".join(f for f in SPEED_FLAGS if f in flags)
    amx = "" if "amx_bf16" in flags else " (no amx)"
    return f"{os.cpu_count()} cores {cpu_model(cpuinfo) or 'unknown CPU'}; flags {have}{amx}"
