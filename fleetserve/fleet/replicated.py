"""`fleetserve serve MODEL --replicas N` (`fleetserve.cli` sends it here): N replica
processes on free loopback ports, a gateway on the public port, supervision, and a clean
stop on SIGTERM.

Each replica is started from a config file written for it, not from a filtered command
line: the resolved serve options (defaults < --config file < command line) minus the
fleet's own (`FLEET_OPTIONS`: host, port, the public keys), plus host 127.0.0.1, its port,
num-threads (unless given: the CPU cores shared between the replicas) and a random internal
key as its operator key. The files are YAML in a private temporary folder (mode 0700, files
0600), removed at stop. The public API key is checked at the gateway only: no replica ever
sees it, and nothing else on the machine can use a replica without the internal key.

On SIGTERM the gateway stops taking requests and finishes those in flight, for as long as a
replica would (its drain timeout); then every replica is drained and stopped. If every
replica fails to start (see `Supervisor`), the fleet stops and exits with status 1, naming
the cause.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fleetserve.fleet.backend import FLEET_BACKENDS, FleetBackend, ReplicaResources
from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.fleet.controller import FleetController
from fleetserve.fleet.options import (
    add_autoscaling_arguments,
    autoscaling_from_args,
    autoscaling_requested,
)
from fleetserve.fleet.scaling import AutoscalingSettings
from fleetserve.fleet.supervisor import DEFAULT_MAX_FAILURES, Supervisor
from fleetserve.gateway.api_keys import ApiKeyStore
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.options import add_gateway_arguments, api_keys_from_args, config_from_args
from fleetserve.gateway.regional_config import PEER_KEY_ENV, RegionsConfig
from fleetserve.gateway.regional_options import (
    add_regional_arguments,
    check_peer_key,
    regions_from_args,
    regions_requested,
)
from fleetserve.gateway.serve import quiet_http_client_logs, run, serve_app
from fleetserve.gateway.tokenizer import TokenizerFiles, load_tokenizer
from fleetserve.http.sockets import bind
from fleetserve.http_limits import HttpLimits
from fleetserve.options import (
    API_KEY_ENV,
    OPERATOR_KEY_ENV,
    default_model,
    parse_size,
    resolve_options,
)

logger = logging.getLogger(__name__)

# Serve options the fleet consumes: never written into a replica's config. (The fleet's
# and the gateway's own flags are not serve options, so they never get there either.)
FLEET_OPTIONS = frozenset({"host", "port", "api_key", "operator_key"})
# Past its drain timeout, a replica gets this long to exit before it is killed.
STOP_MARGIN_S = 5.0
# The flags of `--backend ray` (attribute names), refused with any other backend.
RAY_FLAGS = ("ray_address", "replica_cpus", "replica_gpus", "replica_memory", "replica_resources")


def add_replicated_arguments(parser: argparse.ArgumentParser) -> None:
    """`--replicas`, the fleet's, the autoscaler's and the gateway's options, for
    `fleetserve serve`."""
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="replica processes behind one gateway on --port (default: 1, no gateway); "
        "with autoscaling, how many to start with (default: --min-replicas, at least 1)",
    )
    parser.add_argument(
        "--backend",
        choices=FLEET_BACKENDS.names(),
        default="local",
        help="where the replicas run: processes on this machine (local), or Ray actors on "
        "the nodes of a Ray cluster (ray: pip install fleetserve[ray]) (default: local)",
    )
    add_fleet_arguments(parser)
    add_gateway_arguments(parser, tuning=False)
    add_regional_arguments(parser)
    add_autoscaling_arguments(parser)


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replica-max-failures",
        type=int,
        default=DEFAULT_MAX_FAILURES,
        metavar="K",
        help="give up on a replica that failed to start K times in a row (it exited before "
        "it was ready); the fleet exits if every replica did "
        f"(default: {DEFAULT_MAX_FAILURES})",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="--backend ray: the cluster to join, as `ray.init(address=...)` takes it "
        "(HOST:PORT of its head, or auto); default: $RAY_ADDRESS, or a cluster started with "
        "`ray start` on this machine, or else a new one-node cluster",
    )
    parser.add_argument(
        "--replica-cpus",
        type=float,
        default=None,
        metavar="N",
        help="--backend ray: CPUs each replica asks for (default: 1; also its threads)",
    )
    parser.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        metavar="N",
        help="--backend ray: GPUs each replica asks for (default: 0)",
    )
    parser.add_argument(
        "--replica-memory",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="--backend ray: memory each replica asks for, e.g. 8GiB (default: none)",
    )
    parser.add_argument(
        "--replica-resources",
        type=_resources_json,
        default=None,
        metavar="JSON",
        help="--backend ray: custom resources each replica asks for, e.g. '{\"a100\": 1}' "
        "for nodes started with `ray start --resources '{\"a100\": 8}'`",
    )


def _resources_json(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give an object of names and amounts: {"a100": 1}')
    return value


def backend_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the backend `args.backend` names: for ray, the cluster and
    what each replica asks for. Raises ValueError for Ray's flags with another backend."""
    given = [name for name in RAY_FLAGS if getattr(args, name, None) is not None]
    if getattr(args, "backend", None) != "ray":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --backend ray")
        return {}
    cpus, gpus = args.replica_cpus, args.replica_gpus
    resources = ReplicaResources(
        num_cpus=1.0 if cpus is None else cpus,
        num_gpus=0.0 if gpus is None else gpus,
        memory=args.replica_memory,
        custom=args.replica_resources or {},
    )
    return {"address": args.ray_address, "resources": resources}


def wants_fleet(args: argparse.Namespace) -> bool:
    """Whether `fleetserve serve ARGS` runs a fleet (several replicas, or an autoscaler)
    rather than one replica server."""
    if args.replicas is not None and args.replicas != 1:
        return True  # several, or a bad count `run_replicated` refuses
    if getattr(args, "backend", "local") != "local":
        return True  # even one replica runs on the backend, behind the gateway
    try:
        # a regional gateway fronts even one replica
        return autoscaling_requested(args) or regions_requested(args)
    except (ValueError, TypeError, OSError):
        return True  # a broken --gateway-config: `run_replicated` says what is wrong


def replica_config(options: dict[str, Any], port: int, internal_key: str) -> dict[str, Any]:
    """The config file of the replica on `port`: `options` (resolved serve options, model
    and num_threads included) without the fleet's own, then the fleet's settings. The internal
    key is the replica's operator key, which opens every route: the gateway generates, reads
    /metrics and follows /v1/kv_events with it. The replica honours the `priority` the
    gateway sets from the client's API key (the gateway drops any priority a client sends)."""
    config = {
        name.replace("_", "-"): value
        for name, value in options.items()
        if name not in FLEET_OPTIONS and value is not None
    }
    config.update(
        {
            "host": "127.0.0.1",
            "port": port,
            "operator-key": internal_key,
            "allow-client-priority": True,
        }
    )
    return config


class ReplicaConfigs:
    """Writes the replicas' config files into a private folder; `close()` removes it."""

    def __init__(self, options: dict[str, Any], internal_key: str) -> None:
        self.options = options
        self.internal_key = internal_key
        self.folder = Path(tempfile.mkdtemp(prefix="fleetserve-replicas-"))  # mode 0700

    def write(self, port: int) -> Path:
        path = self.folder / f"replica-{port}.yaml"
        text = yaml.safe_dump(replica_config(self.options, port, self.internal_key))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclasses.dataclass
class FleetPlan:
    """Everything a fleet needs to run, from `fleetserve serve` or `fleetserve gateway`."""

    options: dict[str, Any]  # the replicas' resolved serve options, model included
    config: GatewayConfig
    api_keys: ApiKeyStore | None
    num: int  # replicas to start with
    autoscaling: AutoscalingSettings | None
    host: str
    port: int
    drain_s: float  # SIGTERM's grace, and a scale-down's drain before streams migrate
    limits: HttpLimits
    max_failures: int = DEFAULT_MAX_FAILURES
    log_level: str = "INFO"
    backend: str = "local"
    # The backend's own keyword arguments (`backend_options_from_args`).
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    regions: RegionsConfig | None = None  # the gateway's region and peers


def run_replicated(args: argparse.Namespace) -> int:
    """Entry point for `fleetserve serve --replicas N` (N >= 2) or with autoscaling.
    Returns the exit code."""
    quiet_http_client_logs()
    try:
        options = resolve_options(args)
        # its replicas run with allow-client-priority: the key's class reaches their queues
        config = dataclasses.replace(config_from_args(args), forward_priority=True)
        # The public key is a client key, never an admin one (the admin routes need the
        # operator key); a collision of the two is refused here.
        api_keys = api_keys_from_args(
            args, public_key=options.get("api_key"), operator_key=options.get("operator_key")
        )
        options["model"] = options.get("model") or default_model()
        autoscaling = autoscaling_from_args(args)
        if autoscaling is not None:
            num = autoscaling.initial_replicas(args.replicas)
        else:
            num = 1 if args.replicas is None else int(args.replicas)  # e.g. with --region
            if num < 1:
                raise ValueError(f"--replicas must be >= 1 without autoscaling, got {num}")
        max_failures = int(getattr(args, "replica_max_failures", DEFAULT_MAX_FAILURES))
        if max_failures < 1:
            raise ValueError(f"--replica-max-failures must be >= 1, got {max_failures}")
        backend_options = backend_options_from_args(args)
        regions = regions_from_args(args)
        check_peer_key(regions, api_keys)
    except (ValueError, TypeError, OSError) as exc:
        return _usage_error(args, str(exc))
    drain_s = float(options["drain_timeout"])
    if not (drain_s >= 0 and math.isfinite(drain_s)):
        return _usage_error(args, f"--drain-timeout must be a number >= 0, got {drain_s}")
    plan = FleetPlan(
        options=options,
        config=config,
        api_keys=api_keys,
        num=num,
        autoscaling=autoscaling,
        host=options["host"],
        port=options["port"],
        drain_s=drain_s,
        limits=HttpLimits.from_options(options),  # the public door: the serve limits
        max_failures=max_failures,
        log_level=getattr(args, "log_level", "INFO"),
        backend=getattr(args, "backend", "local"),
        backend_options=backend_options,
        regions=regions,
    )
    return run_fleet(plan, args)


def run_fleet(plan: FleetPlan, args: argparse.Namespace | None = None) -> int:
    """Start the gateway and the replicas of `plan` and serve until SIGTERM/SIGINT, or
    until every replica failed. Returns the exit code."""
    options = plan.options
    model = options["model"]
    tokenizer_path = options.get("tokenizer") or model
    # Replicas share the cores: split them between as many as may run at once; or each
    # has the CPUs it asked a cluster for.
    most = plan.autoscaling.config.max_replicas if plan.autoscaling else plan.num
    threads = max(1, (os.cpu_count() or 1) // most)
    resources = plan.backend_options.get("resources")
    if resources is not None:
        threads = max(1, int(resources.num_cpus))
    replica_options = {**options, "num_threads": options.get("num_threads") or threads}
    internal_key = secrets.token_urlsafe(24)
    # The replicas read their key from their config; the public one stays out of their env.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (API_KEY_ENV, OPERATOR_KEY_ENV, PEER_KEY_ENV)
    }
    try:
        sock = bind(plan.host, plan.port)
    except OSError as exc:
        return _usage_error(args, f"cannot listen on {plan.host}:{plan.port}: {exc}")
    url = f"http://{plan.host}:{sock.getsockname()[1]}"
    scaling = ""
    if plan.autoscaling is not None:
        cfg = plan.autoscaling.config
        scaling = f" (autoscaling {cfg.min_replicas}..{cfg.max_replicas})"
    print(
        f"fleetserve: gateway on {url}; starting {plan.num} replicas of {model}{scaling} ...",
        flush=True,
    )
    configs = ReplicaConfigs(replica_options, internal_key)

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "fleetserve.cli", "--log-level", plan.log_level,
                "serve", "--config", str(configs.write(port))]  # fmt: skip

    gw = Gateway(plan.config, plan.api_keys, upstream_api_key=internal_key, regions=plan.regions)
    try:
        backend = FLEET_BACKENDS.get(plan.backend)(
            command,
            env,
            health_headers={"Authorization": f"Bearer {internal_key}"},
            **plan.backend_options,
        )
    except (ImportError, ConnectionError, ValueError) as exc:
        sock.close()
        configs.close()
        extra = " (pip install fleetserve[ray])" if isinstance(exc, ImportError) else ""
        print(f"fleetserve: backend {plan.backend}: {exc}{extra}", file=sys.stderr, flush=True)
        return 1
    files = TokenizerFiles()
    try:
        failure = run(
            serve_fleet(
                gw,
                backend,
                plan.num,
                sock,
                tokenizer_path,
                files,
                plan.drain_s,
                plan.max_failures,
                limits=plan.limits,
                autoscaling=plan.autoscaling,
            )
        )
    finally:
        files.cleanup()
        configs.close()
    if failure:
        print(f"fleetserve: {failure}", file=sys.stderr, flush=True)
        return 1
    print("fleetserve: stopped", flush=True)
    return 0


def _usage_error(args: argparse.Namespace | None, message: str) -> int:
    parser = getattr(args, "_parser", None)
    if parser is not None:
        parser.error(message)  # exits with status 2
    print(f"fleetserve: {message}", file=sys.stderr, flush=True)
    return 2


async def serve_fleet(
    gw: Gateway,
    backend: FleetBackend,
    num: int,
    sock: socket.socket,
    tokenizer_path: str | None,
    files: TokenizerFiles,
    drain_s: float,
    max_failures: int = DEFAULT_MAX_FAILURES,
    backoff: Callable[[], RestartBackoff] = RestartBackoff,
    limits: HttpLimits | None = None,
    autoscaling: AutoscalingSettings | None = None,
) -> str | None:
    """Run `num` supervised replicas behind `gw` on `sock` until SIGTERM/SIGINT or until
    every replica failed; with `autoscaling`, `num` is where the autoscaler starts from. The
    gateway finishes the streams in flight for up to `drain_s` (the replicas' own drain
    timeout) before the replicas are stopped, each with as long again; a replica scaled down
    gets `drain_s` too before its streams move. Returns why the fleet failed, or None after a
    requested stop."""
    supervisor = Supervisor(
        backend,
        gw,
        num,
        stop_grace_s=drain_s + STOP_MARGIN_S,
        max_failures=max_failures,
        backoff=backoff,
        drain_timeout_s=drain_s,
    )
    supervisor.start()
    scaler = None
    if autoscaling is not None:
        controller = FleetController(
            gw,
            supervisor,
            autoscaling.new_policy(),
            interval_s=autoscaling.interval_s,
            cold_start_estimate_s=autoscaling.cold_start_estimate_s,
        )
        scaler = asyncio.create_task(controller.run(), name="autoscaler")
    tokenizer = None
    if tokenizer_path:
        tokenizer = asyncio.create_task(_load_tokenizer(gw, tokenizer_path, files))
    try:
        await serve_app(
            create_app(gw), sock, graceful_s=drain_s, stop=supervisor.all_failed, limits=limits
        )
    finally:
        logger.info("stopping %d replicas", len(supervisor.replica_ids()))
        if scaler is not None:
            scaler.cancel()
            await asyncio.gather(scaler, return_exceptions=True)
        if tokenizer is not None:
            tokenizer.cancel()
        await supervisor.stop()
        if tokenizer is not None:
            await asyncio.gather(tokenizer, return_exceptions=True)
    if supervisor.all_failed.is_set():
        causes = "; ".join(f"r{i} {why}" for i, why in sorted(supervisor.failed.items()))
        return f"every replica failed to start: {causes}"
    return None


async def _load_tokenizer(gw: Gateway, path: str, files: TokenizerFiles) -> None:
    try:
        gw.set_tokenizer(await asyncio.to_thread(load_tokenizer, path, files))
        logger.info("gateway tokenizer loaded: prefix-aware routing on")
    except (OSError, ValueError) as exc:
        logger.warning("no gateway tokenizer (%s): routing without prompt prefixes", exc)
    except Exception:  # a broken tokenizer must not take the fleet down
        logger.exception("could not load the gateway tokenizer")
