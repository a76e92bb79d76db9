"""The attention backends that correctness tests run under: the torch reference always, the
C++ kernel where it builds. Where it does not, the kernel's cases skip, saying why, except
under `make test` (FLEETSERVE_REQUIRE_TOOLS=1): there they run and fail, as a missing helm or
Ray does, so that a kernel that stopped compiling cannot pass as a skip."""

import os

import pytest

from fleetserve.attention.cpu_extension import available

KERNEL_PROBLEM = available()
needs_kernel = pytest.mark.skipif(
    KERNEL_PROBLEM is not None and not os.environ.get("FLEETSERVE_REQUIRE_TOOLS"),
    reason=f"no C++ kernel: {KERNEL_PROBLEM}",
)
BACKENDS = ["torch", pytest.param("cpu", marks=needs_kernel)]
