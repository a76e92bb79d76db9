"""The attention backends that correctness tests run under: the torch reference always, the
C++ kernel where it builds. Where it does not, the kernel's cases skip, saying why, except
under `make test` (FLEETSERVE_REQUIRE_TOOLS=1): there they run and fail, as a missing helm or
Ray does, so that a kernel that stopped compiling cannot pass as a skip.

On a machine with CUDA the engine-level cases also run on the GPU (`ENGINE_VARIANTS`): both
the torch reference and the Triton kernel, CUDA graphs on and off, in fp32 with TF32 off.
Those skip where there is no CUDA device (CI) and are not part of FLEETSERVE_REQUIRE_TOOLS.
The Triton kernel itself is checked on a CPU too, in Triton's interpreter, where triton
imports (`TRITON_PROBLEM`)."""

import importlib.util
import os

import pytest
import torch

from fleetserve.attention.cpu_extension import available

# FLEETSERVE_TEST_CUDA_ONLY=1 (benchmarks/gpu_check.sh on a GPU machine, whose minutes are
# counted): the CPU cases of the parametrized tests skip, and the C++ kernel is not built.
CUDA_ONLY = os.environ.get("FLEETSERVE_TEST_CUDA_ONLY") == "1"
KERNEL_PROBLEM = "not built (FLEETSERVE_TEST_CUDA_ONLY=1)" if CUDA_ONLY else available()
needs_kernel = pytest.mark.skipif(
    KERNEL_PROBLEM is not None and not os.environ.get("FLEETSERVE_REQUIRE_TOOLS"),
    reason=f"no C++ kernel: {KERNEL_PROBLEM}",
)
BACKENDS = ["torch", pytest.param("cpu", marks=needs_kernel)]
on_cpu = pytest.mark.skipif(CUDA_ONLY, reason="FLEETSERVE_TEST_CUDA_ONLY=1")

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
if HAS_CUDA:  # fp32 on the GPU means fp32: TF32 would change tokens
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into a Python int with
    ``int(array)``, which NumPy 2.4 refuses for arrays of one dimension: a loop bounded by a
    loaded value fails. Take the element instead (the interpreter only; tests only)."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "numpy_shim", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.numpy_shim = True
    interpreter._patch_lang_tensor = patched


if importlib.util.find_spec("triton") is None:
    TRITON_PROBLEM = "triton is not installed (CUDA machines have it)"
else:
    if not HAS_CUDA:  # the kernel runs in Triton's interpreter, on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _interpreter_numpy_shim()
    from fleetserve.attention.triton_paged import problem

    TRITON_PROBLEM = problem()
needs_triton = pytest.mark.skipif(TRITON_PROBLEM is not None, reason=f"{TRITON_PROBLEM}")
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# (device, backend, enforce_eager) for engine-level token-exact tests; ids keep the CPU
# cases' old names ("torch", "cpu").
ENGINE_VARIANTS = [
    pytest.param("cpu", "torch", True, id="torch", marks=on_cpu),
    pytest.param("cpu", "cpu", True, id="cpu", marks=[on_cpu, needs_kernel]),
    *(
        pytest.param(
            "cuda",
            backend,
            eager,
            id=f"cuda-{backend}-{'eager' if eager else 'graphs'}",
            marks=[needs_cuda, *([needs_triton] if backend == "triton" else [])],
        )
        for backend in ("torch", "triton")
        for eager in (True, False)
    ),
]

# (device, backend) for model-level tests: the Triton kernel runs on CPU in the interpreter.
MODEL_VARIANTS = [
    pytest.param("cpu", "torch", id="torch", marks=on_cpu),
    pytest.param("cpu", "cpu", id="cpu", marks=[on_cpu, needs_kernel]),
    pytest.param(
        "cpu",
        "triton",
        id="cpu-triton-interpreter",
        marks=pytest.mark.skipif(
            HAS_CUDA or TRITON_PROBLEM is not None,
            reason="CUDA runs the kernel itself" if HAS_CUDA else f"{TRITON_PROBLEM}",
        ),
    ),
    pytest.param("cuda", "torch", id="cuda-torch", marks=needs_cuda),
    pytest.param("cuda", "triton", id="cuda-triton", marks=[needs_cuda, needs_triton]),
]
