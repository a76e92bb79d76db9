"""The attention backends that correctness tests run under: the torch reference always, the
C++ kernel where it builds (else that case is skipped, saying why)."""

import pytest

from fleetserve.attention.cpu_extension import available

_problem = available()
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(_problem is not None, reason=f"{_problem}")),
]
