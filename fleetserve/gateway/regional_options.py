"""The regional options, shared by `fleetserve gateway` and `fleetserve serve`: flags, and the
`regions:` mapping of `--gateway-config` (flags win). Regions are on when `--region` is given
or the file has a `regions:` mapping.

    fleetserve gateway --replica http://127.0.0.1:8001 --region eu \\
        --peer us=http://us-gw:8000@90 --regional-policy spill   # $FLEETSERVE_PEER_KEY set

```yaml
regions:
  region: eu
  peers:
    - {name: us, url: "http://us-gw:8000", rtt_ms: 90}
  policy: spill               # spill | least_load | local
  max_spill_fraction: 0.5     # of this region's requests over window_s
  window_s: 60
  min_gain_s: 0.05
  prefill_s_per_token: 0.0
  poll_interval_s: 1.0
  poll_timeout_s: 1.0
  unhealthy_after: 3
  peer_key: ...               # better from $FLEETSERVE_PEER_KEY
```
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fleetserve.gateway.api_keys import ApiKeyStore
from fleetserve.gateway.options import gateway_config_file
from fleetserve.gateway.regional_config import (
    PEER_KEY_ENV,
    PeerConfig,
    RegionsConfig,
    parse_peer,
)
from fleetserve.regions.policy import REGIONAL_POLICIES, RegionalConfig

_POLICY_KEYS = ("max_spill_fraction", "window_s", "min_gain_s", "prefill_s_per_token")
_NUMBER_KEYS = {*_POLICY_KEYS, "poll_interval_s", "poll_timeout_s", "rtt_alpha"}
_INT_KEYS = {"unhealthy_after", "max_prefix_blocks"}
_KNOWN = {"region", "peers", "policy", "peer_key", *_NUMBER_KEYS, *_INT_KEYS}
# flag -> (key, type, help)
REGIONAL_FLAGS: dict[str, tuple[str, type, str]] = {
    "max-spill-fraction": (
        "max_spill_fraction",
        float,
        "share of this region's requests that may go to other regions (default 0.5)",
    ),
    "spill-window": ("window_s", float, "seconds over which that share is counted (default 60)"),
    "spill-min-gain": (
        "min_gain_s",
        float,
        "spill only when another region is predicted faster by more than this (default 0.05)",
    ),
    "prefill-s-per-token": (
        "prefill_s_per_token",
        float,
        "prefill seconds a cached prompt token saves: how much a region holding the "
        "prompt's prefix is preferred (default 0: not at all)",
    ),
    "peer-poll-interval": (
        "poll_interval_s",
        float,
        "seconds between two polls of each peer's state (default 1)",
    ),
}


def add_regional_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "regions", "on with --region (or `regions:` in --gateway-config)"
    )
    group.add_argument("--region", default=None, metavar="NAME", help="this gateway's region")
    group.add_argument(
        "--peer",
        action="append",
        default=None,
        metavar="NAME=URL[@RTT_MS]",
        help="another region's gateway, and the round trip to it until one is measured "
        "(repeat for each peer); peers share a secret, $" + PEER_KEY_ENV,
    )
    group.add_argument(
        "--regional-policy",
        choices=REGIONAL_POLICIES.names(),
        default=None,
        help="spill (default): local unless another region is faster, within a cap; "
        "least_load: the least loaded region; local: never leave the region",
    )
    group.add_argument(
        "--peer-key",
        default=None,
        metavar="KEY",
        help=f"the peers' shared secret; better from ${PEER_KEY_ENV} (a flag shows in the "
        "process list). Must differ from every client and operator key.",
    )
    for flag, (key, kind, text) in REGIONAL_FLAGS.items():
        group.add_argument(
            f"--{flag}", dest=f"rg_{key}", type=kind, default=None, metavar="X", help=text
        )


def regions_requested(args: argparse.Namespace) -> bool:
    return getattr(args, "region", None) is not None or "regions" in gateway_config_file(args)


def regions_from_args(args: argparse.Namespace) -> RegionsConfig | None:
    """The regional settings of the flags and the `regions:` mapping (flags win); None when
    regions are off. Raises ValueError naming a bad key or value."""
    section = gateway_config_file(args).get("regions", {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError("`regions:` in --gateway-config must be a mapping")
    unknown = sorted(set(section) - _KNOWN)
    if unknown:
        raise ValueError(f"regions: unknown keys {unknown}; known: {sorted(_KNOWN)}")
    values: dict[str, Any] = dict(section)
    flags = {
        "region": getattr(args, "region", None),
        "policy": getattr(args, "regional_policy", None),
        "peer_key": getattr(args, "peer_key", None) or os.environ.get(PEER_KEY_ENV) or None,
    }
    flags.update({key: getattr(args, f"rg_{key}", None) for key, _, _ in REGIONAL_FLAGS.values()})
    values.update({k: v for k, v in flags.items() if v is not None})
    peer_flags = getattr(args, "peer", None)
    if not regions_requested(args):
        given = [f"--{f}" for f, (k, _, _) in REGIONAL_FLAGS.items() if flags.get(k) is not None]
        given += ["--peer"] if peer_flags else []
        given += ["--regional-policy"] if flags["policy"] is not None else []
        if given:
            raise ValueError(
                f"{', '.join(given)} need --region (or `regions:` in --gateway-config)"
            )
        return None
    if peer_flags:
        peers = [parse_peer(text) for text in peer_flags]
    else:
        peers = [_peer_entry(i, item) for i, item in enumerate(values.get("peers") or [])]
    for key, value in values.items():
        _check_type(key, value)
    if values.get("region") is None:
        raise ValueError("regions: give this gateway's region (--region NAME, or region: NAME)")
    return RegionsConfig(
        region=values.get("region"),
        peers=tuple(peers),
        policy=values.get("policy", "spill"),
        policy_config=RegionalConfig(**{k: values[k] for k in _POLICY_KEYS if k in values}),
        peer_key=values.get("peer_key"),
        **{k: values[k] for k in (_NUMBER_KEYS | _INT_KEYS) - set(_POLICY_KEYS) if k in values},
    )


def _peer_entry(i: int, item: object) -> PeerConfig:
    where = f"regions: peers[{i}]"
    if not isinstance(item, dict) or set(item) - {"name", "url", "rtt_ms"}:
        raise ValueError(f"{where}: expected {{name: NAME, url: URL, rtt_ms: optional}}")
    rtt_ms = item.get("rtt_ms")
    if rtt_ms is not None and (isinstance(rtt_ms, bool) or not isinstance(rtt_ms, int | float)):
        raise ValueError(f"{where}: rtt_ms must be a number of milliseconds, got {rtt_ms!r}")
    try:
        return PeerConfig(
            item.get("name"), item.get("url"), None if rtt_ms is None else rtt_ms / 1000
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_type(key: str, value: object) -> None:
    if key in ("region", "policy", "peer_key"):
        ok = isinstance(value, str)
        kind = "a string"
    elif key in _INT_KEYS:
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif key in _NUMBER_KEYS:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        kind = "a number"
    else:
        return
    if not ok:
        raise ValueError(f"regions: {key} must be {kind}, got {value!r}")


def check_peer_key(regions: RegionsConfig | None, api_keys: ApiKeyStore | None) -> None:
    """The peer key must be no client's or operator's key: it skips the client keys."""
    if regions is None or not regions.peer_key or api_keys is None:
        return
    if api_keys.lookup(regions.peer_key) is not None:
        raise ValueError(
            "the peer key is also a client or operator key: give the peers a secret of their own"
        )
