"""Load a torch model for serving, without unpickling anything unless told to.

What MODEL may be, and how it loads:

- a TorchScript archive (`torch.jit.save`; a zip with `code/`): `torch.jit.load`;
- a `torch.export` program (`.pt2`): `torch.export.load`, run through `.module()`;
- a state dict in safetensors plus `--model-class module:Class` (built with no arguments);
- an HF folder (`config.json`): `transformers` AutoModel, or the sequence-classification
  head when the config names one;
- a file written by `torch.save`: with `weights_only=True` a state dict loads (then
  `--model-class` builds the module), a whole pickled model does not: it needs
  `--trust-pickle`, because unpickling runs whatever code the file names.
"""

from __future__ import annotations

import importlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """MODEL cannot be loaded as asked; the message says what to do."""


@dataclass(frozen=True)
class LoadOptions:
    task: str = "tensor"
    model_class: str | None = None  # "module:Class" for a state dict
    trust_pickle: bool = False
    quantization: str | None = None  # "int8": dynamic int8 of the Linear layers
    # an HF folder's float32 nn.Linear weights laid out once for oneDNN (packed_linear.py):
    # all-MiniLM takes 28% less CPU per sentence; results differ by summation order only
    pack_linears: bool = True


def load_model(model: str, options: LoadOptions) -> torch.nn.Module:
    """The model in eval mode, on CPU, gradients off; `ModelLoadError` if it cannot be."""
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{model}: no such file or folder")
    if path.is_dir():
        module = _load_hf(path, options.task)
    elif path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        module = _from_state_dict(load_file(str(path)), options.model_class, model)
    elif _is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = _load_torch_save(path, options)
    if path.suffix != ".pt2":  # an exported program is traced in eval mode and refuses .eval()
        module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if options.quantization == "int8":
        from fleetserve.tensor.quantize import quantize_int8

        try:
            module = quantize_int8(module)
        except ValueError as exc:
            raise ModelLoadError(f"--quantization int8: {exc}") from None
    elif options.quantization:
        raise ModelLoadError(f"unknown quantization {options.quantization!r}; choose int8")
    elif options.pack_linears and path.is_dir():
        # HF encoders only: their Linear modules are only ever called. A user's module may
        # read `fc.weight` itself, and a packed weight is opaque.
        from fleetserve.models.packed_linear import pack_linears

        pack_linears(module)
    return module


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _load_hf(path: Path, task: str) -> torch.nn.Module:
    import transformers

    if task == "classify":
        return transformers.AutoModelForSequenceClassification.from_pretrained(path)
    return transformers.AutoModel.from_pretrained(path)


def _load_torch_save(path: Path, options: LoadOptions) -> torch.nn.Module:
    if options.trust_pickle:
        logger.warning(
            "--trust-pickle: unpickling %s runs any code it names; load only files you made",
            path,
        )
        loaded = torch.load(str(path), map_location="cpu", weights_only=False)
    else:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError
            raise ModelLoadError(
                f"{path} is a pickle that weights_only loading refuses ({_first_line(exc)}). "
                "Unpickling a whole model runs any code the file names: export it with "
                "torch.jit.save or torch.export, or save its state_dict as safetensors and "
                "pass --model-class module:Class; or, only for a file you made yourself, "
                "pass --trust-pickle"
            ) from None
    if isinstance(loaded, torch.nn.Module):
        return loaded
    if isinstance(loaded, dict):
        return _from_state_dict(loaded, options.model_class, str(path))
    raise ModelLoadError(f"{path} holds a {type(loaded).__name__}, not a model or state dict")


def _from_state_dict(state: dict, model_class: str | None, model: str) -> torch.nn.Module:
    if not model_class:
        raise ModelLoadError(
            f"{model} holds weights only: pass --model-class module:Class to build the network"
        )
    module_name, _, attr = model_class.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(f"--model-class {model_class}: {exc}") from None
    module = cls()
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{model} does not fit {model_class}: {_first_line(exc)}") from None
    return module


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def exported_input(model: str) -> tuple[torch.dtype, tuple[int, ...] | None]:
    """(dtype, row shape) of a torch.export program's one input, dynamic sizes as -1;
    (float32, None) when MODEL does not record it (TorchScript, a class, a pickle)."""
    path = Path(model)
    if path.suffix != ".pt2" or not path.is_file():
        return torch.float32, None
    program = torch.export.load(str(path))
    user_inputs = set(program.graph_signature.user_inputs)
    values = [
        node.meta["val"]
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs and "val" in node.meta
    ]
    if len(values) != 1:
        raise ModelLoadError(f"{model} takes {len(values)} inputs; a tensor model takes one")
    sizes = tuple(d if isinstance(d, int) else -1 for d in values[0].shape)
    return values[0].dtype, sizes[1:]
