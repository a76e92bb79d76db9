"""The engine contract: every message between the front end (`CoreClient`) and the engine
core process (`core_proc`), one dataclass each, and the one codec that carries them.

    front end -> core   EngineCoreRequest (add one request, n == 1), AbortRequests,
                        StatsRequest, Shutdown
    core -> front end   Ready (the model is loaded), Failed (it could not be; the process
                        exits), Outputs (after a step that produced something, and at least
                        every heartbeat while idle)

The codec is msgpack; a dataclass travels as an extension type holding its class name and
its fields, so that a user's dict (`SamplingParams.extra`) can never be mistaken for one.
Only the classes listed in `_TYPES` are ever built from the wire.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from fleetserve.engine.kv_cache_manager import KVEvent
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.sampling_params import SamplingParams


@dataclass
class AbortRequests:
    """Stop these requests and free their KV blocks; ids the core does not know are ignored."""

    request_ids: list[str]


@dataclass
class StatsRequest:
    """Answer with an `Outputs` carrying fresh stats now."""


@dataclass
class Shutdown:
    """Stop the loop and exit."""


@dataclass
class Ready:
    max_model_len: int
    block_size: int
    vocab_size: int
    eos_token_ids: list[int]
    pid: int


@dataclass
class Failed:
    error: str


@dataclass
class Outputs:
    """One tick of the core: the outputs of the steps since the last tick, the KV-cache
    changes (for a prefix-aware router), and `EngineCore.stats()` when due (else None)."""

    outputs: list[EngineCoreOutput]
    kv_events: list[KVEvent]
    stats: dict | None = None


FrontEndMessage = EngineCoreRequest | AbortRequests | StatsRequest | Shutdown
CoreMessage = Ready | Failed | Outputs

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        EngineCoreRequest,
        AbortRequests,
        StatsRequest,
        Shutdown,
        Ready,
        Failed,
        Outputs,
        SamplingParams,
        EngineCoreOutput,
        KVEvent,
    )
}
_DATACLASS = 1  # the msgpack extension code of a dataclass in `_TYPES`


def encode(message: Any) -> bytes:
    """Raises `TypeError` for a value msgpack cannot carry (e.g. an object in `extra`)."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def decode(raw: bytes) -> Any:
    """The message in `raw`. Raises `ValueError` (or `TypeError`) for bytes that are not
    one, or whose fields its class refuses (e.g. invalid `SamplingParams`)."""
    # Logprobs are maps keyed by token id: allow int keys.
    return msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _default(obj: Any) -> msgpack.ExtType:
    if _TYPES.get(type(obj).__name__) is not type(obj):
        raise TypeError(f"cannot send a {type(obj).__name__} to the engine core")
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return msgpack.ExtType(_DATACLASS, encode([type(obj).__name__, fields]))


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _DATACLASS:
        raise ValueError(f"unknown msgpack extension {code}")
    name, fields = decode(data)
    cls = _TYPES.get(name)
    if cls is None or not isinstance(fields, dict):
        raise ValueError(f"not an engine message: {name!r}")
    return cls(**fields)
