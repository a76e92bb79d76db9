"""Gateway command-line options, shared by `fleetserve gateway` and
`fleetserve serve --replicas N`. Every `GatewayConfig` field can come from a YAML file
(`--gateway-config`); the few flags below override it. The YAML file may also hold
`operator_key` (see `api_keys_from_args`), an `autoscaling:` mapping (read by
`fleetserve.fleet.options`) and a `regions:` mapping (`fleetserve.gateway.regional_options`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import yaml

from fleetserve.gateway.api_keys import (
    ApiKeyStore,
    load_api_keys,
    single_key_store,
    with_operator_key,
)
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.policies import POLICIES
from fleetserve.options import OPERATOR_KEY_ENV

# dest -> GatewayConfig field, for the flags of `fleetserve gateway`
TUNING_FLAGS = {
    "max_retries": (int, "retries before the first byte"),
    "max_migrations": (int, "continuations of one stream after replica failures"),
    "stall_timeout": (float, "seconds of silence after which a stream is migrated"),
    "first_chunk_timeout": (float, "seconds a replica may take to its first event"),
    "request_timeout": (float, "default deadline per request (X-Request-Timeout overrides)"),
    "probe_interval": (float, "seconds between active health probes"),
    "max_outstanding_per_replica": (int, "requests in flight per replica before queueing"),
    "max_queue": (int, "requests waiting for a slot before 429"),
    "seed": (int, "seed of randomized policies (power_of_two)"),
    "max_body_bytes": (int, "largest request body accepted (413 beyond; default 4 MiB)"),
    "max_prompts_per_request": (int, "prompts in one completions request (default 256)"),
    "max_n": (int, "choices per prompt, `n` (default 128)"),
    "max_choices_per_request": (int, "prompts x n in one request (default 256)"),
    "retry_budget_percent": (float, "retries in flight, as a %% of requests in flight (20)"),
    "retry_min_concurrency": (int, "retries in flight always allowed (default 3)"),
}
_SECRETS = {"operator_key"}  # YAML keys read here that are not GatewayConfig fields
_SECTIONS = {"autoscaling", "regions"}  # YAML keys other modules read
_FIELD = {
    "stall_timeout": "stall_timeout_s",
    "first_chunk_timeout": "first_chunk_timeout_s",
    "request_timeout": "default_request_timeout_s",
    "probe_interval": "probe_interval_s",
}


def add_gateway_arguments(parser: argparse.ArgumentParser, tuning: bool = True) -> None:
    """`tuning=False` adds only --router, --api-keys-file and --gateway-config (for
    `fleetserve serve`, whose own flags, --operator-key included, would clash)."""
    group = parser.add_argument_group("gateway")
    group.add_argument(
        "--router",
        choices=sorted(POLICIES),
        default=None,
        help="routing policy (default: prefix_aware)",
    )
    group.add_argument(
        "--api-keys-file",
        metavar="FILE.yaml",
        default=None,
        help="API keys (sha256 hashes) with limits and priorities; see fleetserve.gateway.api_keys",
    )
    group.add_argument(
        "--gateway-config",
        metavar="FILE.yaml",
        default=None,
        help="YAML with any GatewayConfig field",
    )
    if not tuning:
        return  # `fleetserve serve` has its own --operator-key: the gateway's, with --replicas
    group.add_argument(
        "--operator-key",
        metavar="KEY",
        default=None,
        help=f"turns on /admin/* and guards /metrics and /docs; better from ${OPERATOR_KEY_ENV} "
        "(a flag shows in the process list). Must differ from every client key.",
    )
    for dest, (kind, text) in TUNING_FLAGS.items():
        group.add_argument(
            "--" + dest.replace("_", "-"),
            dest=f"gw_{dest}",
            type=kind,
            default=None,
            metavar=_metavar(dest, kind),
            help=text,
        )


def _metavar(dest: str, kind: type) -> str:
    if dest.endswith("percent"):
        return "PERCENT"
    return "SECONDS" if kind is float else "N"


def gateway_config_file(args: argparse.Namespace) -> dict:
    """The `--gateway-config` YAML as a mapping ({} without one); raises ValueError for an
    unknown key."""
    path = getattr(args, "gateway_config", None)
    if not path:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of GatewayConfig fields")
    known = {f.name for f in dataclasses.fields(GatewayConfig)} | _SECRETS | _SECTIONS
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    return data


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    values = {k: v for k, v in gateway_config_file(args).items() if k not in _SECRETS | _SECTIONS}
    for dest in TUNING_FLAGS:
        value = getattr(args, f"gw_{dest}", None)
        if value is not None:
            values[_FIELD.get(dest, dest)] = value
    if getattr(args, "router", None):
        values["router"] = args.router
    return GatewayConfig(**values)


def operator_key_from_args(args: argparse.Namespace) -> str | None:
    """--operator-key, else $FLEETSERVE_OPERATOR_KEY, else the config file's operator_key."""
    key = getattr(args, "operator_key", None) or os.environ.get(OPERATOR_KEY_ENV)
    if not key:
        key = gateway_config_file(args).get("operator_key")
    if key is not None and not isinstance(key, str):
        raise ValueError("operator_key must be a string (quote it in the YAML file)")
    return key or None


def api_keys_from_args(
    args: argparse.Namespace, public_key: str | None = None, operator_key: str | None = None
) -> ApiKeyStore | None:
    """The client keys (--api-keys-file, else the single `public_key`) plus the operator
    key (`operator_key`, else `operator_key_from_args`). None: clients are anonymous and the
    admin routes are off. Raises ValueError when the operator key is also a client key."""
    path = getattr(args, "api_keys_file", None)
    store = load_api_keys(path) if path else None
    if store is None and public_key:
        store = single_key_store(public_key)
    return with_operator_key(store, operator_key or operator_key_from_args(args))
