"""Builds and loads the C++ CPU kernels (csrc/: paged attention, fused layer ops) as one library.

    python -m fleetserve.attention.cpu_extension   # what `make` runs: build once, print path

The library is compiled with the machine's own gcc for the machine's own ISA
(``-march=native``, falling back to a portable build), straight from torch's headers and
libraries: two translation units need no ninja and no setup.py. It is cached under
``build/fleetserve-ext/KEY/``, where KEY hashes the sources, the torch version, the compile
compiler, the compile flags and the CPU's flags, so that a machine with another CPU or
another torch never loads a library built for a different one. Once built, loading it needs
no compiler.

``FLEETSERVE_BUILD_DIR`` moves that cache (e.g. to /tmp in a read-only image). Replicas that
start together share it: each compile holds ``fcntl.flock`` on ``KEY/.lock``, and whoever
waited for it finds the library built and compiles nothing.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fleetserve.cpu import cpu_flags

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCES = ("paged_attention.cpp", "fused_ops.cpp")
DEFAULT_BUILD_ROOT = ROOT / "build" / "fleetserve-ext"
LIBRARY = "fleetserve_cpu.so"
# Tried in order: the build machine's own ISA first, then a portable one.
FLAG_SETS = (
    ("-O3", "-march=native", "-ffast-math"),
    ("-O3", "-ffast-math"),
)


class ExtensionUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class Extension:
    path: Path
    flags: tuple[str, ...]


def build_root() -> Path:
    """Where built libraries are cached: $FLEETSERVE_BUILD_DIR, else build/ in the source tree
    (which an image may not let its user write)."""
    return Path(os.environ.get("FLEETSERVE_BUILD_DIR") or DEFAULT_BUILD_ROOT)


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _key(flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*.[ch]*")):  # the sources and the headers they include
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_compiler().encode())
    h.update(" ".join(flags).encode())
    h.update(cpu_flags().encode())
    return h.hexdigest()[:16]


def _compile(flags: tuple[str, ...], out: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [
        _compiler(),
        *flags,
        "-std=c++17",
        "-fPIC",
        "-shared",
        "-fopenmp",  # at::parallel_for's OpenMP backend lives in headers
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()),
        *(str(CSRC / s) for s in SOURCES),
        *(f"-L{p}" for p in libs),
        *(f"-Wl,-rpath,{p}" for p in libs),
        "-lc10",
        "-ltorch_cpu",
        "-o",
        str(tmp),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ExtensionUnavailable(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
        tmp.replace(out)  # atomic: a loader that takes no lock never sees half a library
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Holds the build lock of `folder`; the kernel drops it if this process dies."""
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _compile_alone(flags: tuple[str, ...], out: Path) -> None:
    """`_compile` under the lock, after clearing what a compile killed midway left behind."""
    for stale in out.parent.glob("*.tmp"):
        stale.unlink(missing_ok=True)
    logger.info("compiling the paged-attention kernel (%s) into %s", " ".join(flags), out)
    _compile(flags, out)


def build() -> Extension:
    """The cached library, compiled first if needed. Raises `ExtensionUnavailable`."""
    if not all((CSRC / s).is_file() for s in SOURCES):
        raise ExtensionUnavailable(f"no C++ sources at {CSRC} (an installed, not a source, copy)")
    errors = []
    for flags in FLAG_SETS:
        path = build_root() / _key(flags) / LIBRARY
        try:
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                with _locked(path.parent):
                    if not path.is_file():  # else another process built it while we waited
                        _compile_alone(flags, path)
        except (ExtensionUnavailable, OSError) as exc:
            errors.append(str(exc))
            continue
        return Extension(path, flags)
    raise ExtensionUnavailable("; ".join(errors))


def load() -> Extension:
    """Builds (if needed) and loads the library, registering
    ``torch.ops.fleetserve.paged_attention``. Raises `ExtensionUnavailable`. Tried once per
    process: a failed compile is not repeated by every caller."""
    outcome = _load_once()
    if isinstance(outcome, ExtensionUnavailable):
        raise outcome
    return outcome


@functools.cache
def _load_once() -> Extension | ExtensionUnavailable:
    if sys.platform != "linux":
        return ExtensionUnavailable(f"the kernel is built for Linux only, not {sys.platform}")
    try:
        ext = build()
        torch.ops.load_library(str(ext.path))
    except ExtensionUnavailable as exc:
        return exc
    except OSError as exc:
        return ExtensionUnavailable(f"cannot load the kernel: {exc}")
    return ext


def available() -> str | None:
    """None when the kernel loads; else the reason it does not."""
    try:
        load()
    except ExtensionUnavailable as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    try:
        print(build().path)
    except ExtensionUnavailable as exc:
        sys.exit(f"paged-attention kernel unavailable (the torch backend still works): {exc}")
