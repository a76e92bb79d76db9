"""Finding and reading the safetensors shards of an HF model folder. Never unpickles."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
EXPECTED_FILES = (
    "config.json and model.safetensors (or model-0000x-of-0000y.safetensors shards with "
    f"{INDEX_FILE})"
)


def pickle_refusal(path: Path) -> ValueError:
    return ValueError(
        f"{path} is a pickle checkpoint; fleetserve never loads pickles (unpickling runs "
        "arbitrary code). Convert it to safetensors first, e.g. load it in a trusted "
        "environment with transformers and call model.save_pretrained(folder, "
        "safe_serialization=True)."
    )


def safetensors_files(folder: Path) -> list[Path]:
    """The shard files of ``folder``: those listed by the index if there is one, else
    ``model.safetensors``, else every ``*.safetensors``. Raises ValueError if the folder only
    holds pickles and FileNotFoundError if it holds no weights at all."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        if files:
            return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(pickles[0])
    raise FileNotFoundError(f"{folder} holds no *.safetensors weights; expected {EXPECTED_FILES}")


def count_tensors(files: list[Path]) -> int:
    total = 0
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as sf:
            total += len(sf.keys())
    return total


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor, memory-mapped on CPU, one at a time."""
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as sf:
            names = sf.keys()
            for name in names:
                yield name, sf.get_tensor(name)
