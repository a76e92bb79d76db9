"""What kind of serving a MODEL path asks for, read from the path alone (no torch): the
command line picks the LLM server or the tensor server with it."""

from __future__ import annotations

import json
from pathlib import Path

TASKS = ("auto", "generate", "embed", "classify", "tensor")
# HF model types served as encoders (embeddings); causal LMs go to the LLM engine.
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert", "deberta-v2"}
)
TENSOR_SUFFIXES = frozenset({".pt", ".pth", ".pt2", ".ts", ".jit", ".safetensors", ".bin"})


def detect_task(model: str) -> str:
    """'generate' (the LLM engine), 'embed', 'classify' or 'tensor'."""
    path = Path(model)
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except ValueError:
            return "generate"  # let the LLM loader say what is wrong with it
        architectures = config.get("architectures") or []
        if any(a.endswith("ForCausalLM") for a in architectures):
            return "generate"
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return "classify"
        if config.get("model_type") in ENCODER_TYPES:
            return "embed"
        return "generate"
    if path.suffix in TENSOR_SUFFIXES:
        return "tensor"
    return "generate"


def resolve_task(task: str | None, model: str | None) -> str:
    """`--task` as given, or detected from MODEL when it is 'auto' (no MODEL: the default LLM)."""
    task = task or "auto"
    if task not in TASKS:
        raise ValueError(f"unknown --task {task!r}; choose one of {list(TASKS)}")
    if task != "auto":
        return task
    return detect_task(model) if model else "generate"
