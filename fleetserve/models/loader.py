"""``load_model``: a checkpoint path in, a ready model and its config out.

The model is built on the meta device (no memory, no random init), cast to the target dtype,
allocated on the target device with ``to_empty`` and filled tensor by tensor from the
checkpoint, so peak memory is about one copy of the model plus one checkpoint tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fleetserve.models.config import ModelConfig
from fleetserve.models.gguf_loader import gguf_config, iter_gguf_tensors, open_gguf
from fleetserve.models.packed_linear import pack_linears
from fleetserve.models.quantization import QUANTIZATION_METHODS, quantize_int8
from fleetserve.models.registry import get_arch_spec
from fleetserve.models.safetensors_loader import (
    EXPECTED_FILES,
    PICKLE_SUFFIXES,
    count_tensors,
    iter_safetensors,
    pickle_refusal,
    safetensors_files,
)

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """ "auto" is the checkpoint's ``torch_dtype``: what an HF folder says (float32 if it says
    nothing), float32 for GGUF, whose tensors are dequantized to float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return _DTYPES[config.torch_dtype]
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto', {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def read_checkpoint(
    path: str | Path,
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], int]:
    """(config, tensors named as transformers names them, tensor count) of an HF folder or a
    .gguf file. Refuses pickles by file name, before opening them."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"model path {p} does not exist; expected an HF folder with "
            f"{EXPECTED_FILES}, or a .gguf file"
        )
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(p)
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected an HF folder with {EXPECTED_FILES}, or a .gguf file")
        reader = open_gguf(p)
        config = gguf_config(reader)
        return config, iter_gguf_tensors(reader, config), len(reader.tensors)
    files = safetensors_files(p)  # refuses pickle-only folders first
    config = ModelConfig.from_hf_folder(p)
    return config, iter_safetensors(files), count_tensors(files)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    progress: bool = False,
    packed: bool = True,
) -> tuple[nn.Module, ModelConfig]:
    """Loads a decoder model for inference (eval mode, no grads).

    path: an HF folder (config.json + *.safetensors [+ index]) or a .gguf file.
    dtype: "auto" (see ``resolve_dtype``), "float32", "bfloat16", "float16" or a torch.dtype.
    quantization: None, or "int8": weight-only int8 for every Linear of the decoder layers;
        embeddings, lm_head and norms stay in ``dtype``.
    progress: a tqdm bar over the checkpoint's tensors.
    packed: on CPU, reorder float Linear weights once for oneDNN (``pack_linears``); False
        keeps plain ``F.linear``, the reference.
    """
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization {quantization!r} is not supported; use None or one of "
            f"{list(QUANTIZATION_METHODS)}"
        )
    config, tensors, num_tensors = read_checkpoint(path)
    torch_dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    spec = get_arch_spec(config.architecture)
    with torch.device("meta"):
        model = spec.model_cls(config)
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    model.init_buffers(device)
    bar = tqdm(
        tensors,
        total=num_tensors,
        desc=f"loading {Path(path).name}",
        unit="tensor",
        disable=not progress,
    )
    with torch.no_grad():
        model.load_weights(bar)
        if quantization == "int8":
            quantize_int8(model.model.layers)
        if packed:
            pack_linears(model)
    model.eval().requires_grad_(False)
    logger.info(
        "loaded %s (%s, %d layers) as %s on %s%s",
        Path(path).name,
        config.architecture,
        config.num_hidden_layers,
        torch_dtype,
        device,
        f", {quantization}" if quantization else "",
    )
    return model, config
