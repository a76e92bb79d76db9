"""Gateway command-line options, shared by `fleetserve gateway` and
`fleetserve serve --replicas N`. Every `GatewayConfig` field can come from a YAML file
(`--gateway-config`); the few flags below override it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from fleetserve.gateway.api_keys import ApiKeyStore, load_api_keys
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.policies import POLICIES

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
}
_FIELD = {
    "stall_timeout": "stall_timeout_s",
    "first_chunk_timeout": "first_chunk_timeout_s",
    "request_timeout": "default_request_timeout_s",
    "probe_interval": "probe_interval_s",
}


def add_gateway_arguments(parser: argparse.ArgumentParser, tuning: bool = True) -> None:
    """`tuning=False` adds only --router, --api-keys-file and --gateway-config (for
    `fleetserve serve`, whose own flags would clash with the tuning ones)."""
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
    if tuning:
        for dest, (kind, text) in TUNING_FLAGS.items():
            group.add_argument(
                "--" + dest.replace("_", "-"),
                dest=f"gw_{dest}",
                type=kind,
                default=None,
                metavar="SECONDS" if kind is float else "N",
                help=text,
            )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    values: dict = {}
    path = getattr(args, "gateway_config", None)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(GatewayConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        values.update(data)
    for dest in TUNING_FLAGS:
        value = getattr(args, f"gw_{dest}", None)
        if value is not None:
            values[_FIELD.get(dest, dest)] = value
    if getattr(args, "router", None):
        values["router"] = args.router
    return GatewayConfig(**values)


def api_keys_from_args(args: argparse.Namespace) -> ApiKeyStore | None:
    path = getattr(args, "api_keys_file", None)
    return load_api_keys(path) if path else None
