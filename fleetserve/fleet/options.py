"""The autoscaler's options, shared by `fleetserve serve` and `fleetserve gateway --backend`.

Every knob is a flag and a key of the `autoscaling:` mapping in `--gateway-config` (the
`AutoscalerConfig` field names, plus `policy`, `interval_s` and `cold_start_estimate_s`);
flags win. Autoscaling is on when `--min-replicas` or `--max-replicas` is given, or the file
has an `autoscaling:` mapping.

    fleetserve serve MODEL --min-replicas 0 --max-replicas 4
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fleetserve.fleet.autoscaler import AUTOSCALING_POLICIES, AutoscalerConfig
from fleetserve.fleet.scaling import AutoscalingSettings
from fleetserve.gateway.options import gateway_config_file

_DEFAULTS = AutoscalerConfig()
# flag -> (key in the `autoscaling:` mapping, type, help). The keys are AutoscalerConfig's or
# AutoscalingSettings' fields.
AUTOSCALING_FLAGS: dict[str, tuple[str, type, str]] = {
    "min-replicas": (
        "min_replicas",
        int,
        f"fewest replicas; 0 stops the last one when idle (default {_DEFAULTS.min_replicas})",
    ),
    "max-replicas": ("max_replicas", int, f"most replicas (default {_DEFAULTS.max_replicas})"),
    "target-concurrency": (
        "target_concurrency",
        float,
        f"running + waiting requests wanted per replica (default {_DEFAULTS.target_concurrency:g})",
    ),
    "stable-window": (
        "stable_window_s",
        float,
        f"seconds of load averaged to decide (default {_DEFAULTS.stable_window_s:g})",
    ),
    "panic-window-fraction": (
        "panic_window_fraction",
        float,
        "the panic window, as a fraction of the stable window "
        f"(default {_DEFAULTS.panic_window_fraction:g})",
    ),
    "panic-threshold": (
        "panic_threshold",
        float,
        "panic (scale up at once, never down) when the panic window asks for this many times "
        f"the ready replicas (default {_DEFAULTS.panic_threshold:g})",
    ),
    "max-scale-up-step": (
        "max_scale_up_step",
        int,
        f"replicas added per decision, at most (default {_DEFAULTS.max_scale_up_step})",
    ),
    "max-scale-up-rate": (
        "max_scale_up_rate",
        float,
        f"at most this factor of the current size (default {_DEFAULTS.max_scale_up_rate:g})",
    ),
    "max-scale-down-step": (
        "max_scale_down_step",
        int,
        f"replicas removed per decision, at most (default {_DEFAULTS.max_scale_down_step})",
    ),
    "max-scale-down-rate": (
        "max_scale_down_rate",
        float,
        f"at least the current size divided by this (default {_DEFAULTS.max_scale_down_rate:g})",
    ),
    "scale-down-tolerance": (
        "scale_down_tolerance",
        float,
        "shrink only below (1 - this) x the target per replica "
        f"(default {_DEFAULTS.scale_down_tolerance:g})",
    ),
    "scale-down-delay": (
        "scale_down_delay_s",
        float,
        "seconds a lower load must last before a replica goes; never shorter than a measured "
        f"cold start (default {_DEFAULTS.scale_down_delay_s:g})",
    ),
    "scale-to-zero-grace": (
        "scale_to_zero_grace_s",
        float,
        "with --min-replicas 0: seconds without any request before the last replica stops; "
        f"never shorter than a measured cold start (default {_DEFAULTS.scale_to_zero_grace_s:g})",
    ),
    "ttft-slo": (
        "ttft_p90_slo_s",
        float,
        "seconds: a time-to-first-token p90 above it asks for one more replica (default: none)",
    ),
    "itl-slo": (
        "itl_p90_slo_s",
        float,
        "seconds: an inter-token latency p90 above it asks for one more replica (default: none)",
    ),
    "autoscale-interval": (
        "interval_s",
        float,
        f"seconds between two decisions (default {AutoscalingSettings.interval_s:g})",
    ),
    "cold-start-estimate": (
        "cold_start_estimate_s",
        float,
        "seconds a replica is assumed to take from start to ready until one is measured: at "
        "zero replicas a request whose deadline is sooner gets 503 with Retry-After "
        f"(default {AutoscalingSettings.cold_start_estimate_s:g})",
    ),
    "autoscaler": ("policy", str, "the autoscaling policy (default kpa, Knative's KPA)"),
}
_SETTINGS_KEYS = {"policy", "interval_s", "cold_start_estimate_s"}
_CONFIG_KEYS = {f.name for f in dataclasses.fields(AutoscalerConfig)}


def add_autoscaling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "autoscaling", "on with --min-replicas or --max-replicas (or `autoscaling:` in the config)"
    )
    for flag, (key, kind, text) in AUTOSCALING_FLAGS.items():
        extra: dict[str, Any] = {}
        if key == "policy":
            extra["choices"] = AUTOSCALING_POLICIES.names()
        else:
            extra["metavar"] = "SECONDS" if key.endswith("_s") else ("N" if kind is int else "X")
        group.add_argument(
            f"--{flag}", dest=f"as_{key}", type=kind, default=None, help=text, **extra
        )


def autoscaling_requested(args: argparse.Namespace) -> bool:
    """Whether `args` turn the autoscaler on (without reading more than the flags and the
    config file)."""
    return (
        getattr(args, "as_min_replicas", None) is not None
        or getattr(args, "as_max_replicas", None) is not None
        or "autoscaling" in gateway_config_file(args)
    )


def autoscaling_from_args(args: argparse.Namespace) -> AutoscalingSettings | None:
    """The settings the flags and the config file's `autoscaling:` mapping give (flags win);
    None when autoscaling is off. Raises ValueError naming a bad key or value."""
    section = gateway_config_file(args).get("autoscaling", {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError("`autoscaling:` in --gateway-config must be a mapping of settings")
    known = _CONFIG_KEYS | _SETTINGS_KEYS
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"autoscaling: unknown keys {unknown}; known: {sorted(known)}")
    flags = {
        key: getattr(args, f"as_{key}")
        for key, _, _ in AUTOSCALING_FLAGS.values()
        if getattr(args, f"as_{key}", None) is not None
    }
    values = {**section, **flags}
    if not autoscaling_requested(args):
        if flags:
            raise ValueError(
                "autoscaling flags need --min-replicas or --max-replicas (or `autoscaling:` "
                "in --gateway-config)"
            )
        return None
    for key, value in values.items():
        _check_type(key, value)
    config = AutoscalerConfig(**{k: v for k, v in values.items() if k in _CONFIG_KEYS})
    return AutoscalingSettings(
        config=config, **{k: v for k, v in values.items() if k in _SETTINGS_KEYS}
    )


def _check_type(key: str, value: Any) -> None:
    """A config file's value must have the flag's type (YAML gives strings, bools, ...)."""
    if key in ("ttft_p90_slo_s", "itl_p90_slo_s") and value is None:
        return
    kinds = {name: k for name, k, _ in AUTOSCALING_FLAGS.values()}
    kinds.update({f.name: f.type for f in dataclasses.fields(AutoscalerConfig)})
    kind = kinds[key]
    if isinstance(kind, str):  # a dataclass field's annotation, as text
        kind = {"int": int, "float": float, "str": str}.get(kind, float)
    if kind is str:
        ok = isinstance(value, str)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"autoscaling: {key} must be {kind.__name__}, got {value!r}")
