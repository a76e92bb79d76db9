"""`fleetserve gateway --replica URL ...`: one front door for replicas that already run; or
`fleetserve gateway --backend local --model MODEL`: the gateway starts, supervises and (with
`--min-replicas`/`--max-replicas`) autoscales its replicas on a fleet backend; or
`fleetserve gateway --discover kubernetes://NS/SERVICE`: it follows the replica pods of a
Service, and publishes the replicas it wants for KEDA or an HPA."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import socket

from fleetserve.fleet.backend import FLEET_BACKENDS
from fleetserve.fleet.controller import FleetController
from fleetserve.fleet.kubernetes import DiscoveryTarget, ExternalScaler, KubernetesDiscovery
from fleetserve.fleet.options import add_autoscaling_arguments, autoscaling_from_args
from fleetserve.fleet.replicated import (
    FleetPlan,
    add_fleet_arguments,
    backend_options_from_args,
    run_fleet,
)
from fleetserve.fleet.scaling import AutoscalingSettings
from fleetserve.gateway.app import create_app
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.options import add_gateway_arguments, api_keys_from_args, config_from_args
from fleetserve.gateway.regional_options import (
    add_regional_arguments,
    check_peer_key,
    regions_from_args,
)
from fleetserve.gateway.replica import ReplicaKind, check_replica_url
from fleetserve.gateway.serve import quiet_http_client_logs, run, serve_app
from fleetserve.gateway.tokenizer import TokenizerFiles, load_tokenizer
from fleetserve.http.sockets import bind
from fleetserve.http_limits import HttpLimits, add_http_limit_arguments
from fleetserve.options import default_model, resolve_options

logger = logging.getLogger(__name__)

UPSTREAM_KEY_ENV = "FLEETSERVE_UPSTREAM_API_KEY"  # the replicas' own API key, if they need one


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gateway",
        help="front several replicas with routing, failover and admission control",
        description="Front running replicas: routing policies, retries, mid-stream "
        "migration, health probes, circuit breakers, API keys and rate limits.",
        epilog="Examples: fleetserve gateway --replica http://127.0.0.1:8001 "
        "--replica http://127.0.0.1:8002 --tokenizer MODEL --port 8000; "
        "fleetserve gateway --backend local --model MODEL --min-replicas 0 --max-replicas 4",
    )
    p.add_argument(
        "--replica",
        action="append",
        default=None,
        metavar="URL",
        help="a replica's base URL (repeat for each replica); or --backend",
    )
    p.add_argument(
        "--replica-kind",
        action="append",
        choices=[k.value for k in ReplicaKind],
        default=None,
        help="fleetserve (default) or openai: any OpenAI-compatible server, without "
        "the features that need fleetserve's extensions (migration, prefix index). "
        "Once for all replicas, or once per --replica, in order.",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="the replicas' model folder or .gguf file: enables prefix-aware "
        "routing and exact text across migrations",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    # The replicas' own API key, if they need one, comes from $FLEETSERVE_UPSTREAM_API_KEY;
    # it goes only to these --replica URLs, never to one added through the admin API.
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may take to finish (default: 30)",
    )
    add_gateway_arguments(p)
    add_regional_arguments(p)
    add_http_limit_arguments(p)
    p.add_argument(
        "--discover",
        metavar="kubernetes://NAMESPACE/SERVICE",
        default=None,
        help="follow the replica pods of a headless Service (its EndpointSlices, read with "
        "the pod's ServiceAccount); with --min/--max-replicas the gateway publishes the "
        "replicas it wants for KEDA or an HPA and holds requests at zero",
    )
    fleet = p.add_argument_group("fleet", "with --backend: replicas this gateway starts")
    fleet.add_argument(
        "--backend",
        choices=FLEET_BACKENDS.names(),
        default=None,
        help="start and supervise the replicas on this backend instead of fronting --replica URLs",
    )
    fleet.add_argument(
        "--model", default=None, help="the replicas' model (default: the default model)"
    )
    fleet.add_argument(
        "--serve-config",
        metavar="FILE.yaml",
        default=None,
        help="the replicas' options: the keys of `fleetserve serve --config`",
    )
    fleet.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="replicas to start (default: 1; with autoscaling --min-replicas, at least 1)",
    )
    add_fleet_arguments(fleet)
    add_autoscaling_arguments(p)
    p.set_defaults(func=main, _parser=p)


def main(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    quiet_http_client_logs()
    if not (args.drain_timeout >= 0 and math.isfinite(args.drain_timeout)):
        parser.error(f"--drain-timeout must be a number >= 0, got {args.drain_timeout}")
    sources = sum((bool(args.replica), args.backend is not None, args.discover is not None))
    if sources != 1:
        parser.error(
            "give one of --replica URL (repeat for each replica), --backend NAME (the gateway "
            "starts its replicas) or --discover kubernetes://NAMESPACE/SERVICE"
        )
    if args.backend is not None:
        return _run_backend(args, parser)
    for name in ("model", "serve_config", "replicas"):
        if getattr(args, name) is not None:
            parser.error(f"--{name.replace('_', '-')} needs --backend")
    urls = args.replica or []
    kinds = args.replica_kind or ["fleetserve"]
    if len(kinds) not in (1, len(urls)):
        parser.error("give --replica-kind once, or once per --replica")
    if len(kinds) == 1:
        kinds = kinds * len(urls)
    try:
        autoscaling = autoscaling_from_args(args)
        if autoscaling is not None and args.discover is None:
            raise ValueError(
                "autoscaling needs --backend or --discover: the gateway cannot start --replica URLs"
            )
        config = config_from_args(args)
        api_keys = api_keys_from_args(args)
        regions = regions_from_args(args)
        check_peer_key(regions, api_keys)
        limits = HttpLimits.from_options(vars(args))
        for url in urls:
            check_replica_url(url)
        discovery = None
        if args.discover is not None:
            discovery = KubernetesDiscovery(DiscoveryTarget.parse(args.discover))
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        parser.error(f"cannot listen on {args.host}:{args.port}: {exc}")
    files = TokenizerFiles()
    try:
        tokenizer = load_tokenizer(args.tokenizer, files) if args.tokenizer else None
        gw = Gateway(
            config,
            api_keys,
            tokenizer,
            upstream_api_key=os.environ.get(UPSTREAM_KEY_ENV),
            regions=regions,
        )
        for url, kind in zip(urls, kinds, strict=True):
            gw.add_replica(url, ReplicaKind(kind))
        front = f"http://{args.host}:{sock.getsockname()[1]}"
        what = f"{len(urls)} replicas" if discovery is None else f"replicas of {args.discover}"
        where = "" if regions is None else f", region {regions.region}, {len(regions.peers)} peers"
        print(
            f"fleetserve gateway: {what} behind {front} (router {config.router}{where})",
            flush=True,
        )
        run(_serve(gw, sock, args.drain_timeout, limits, discovery, autoscaling))
    finally:
        files.cleanup()
    return 0


async def _serve(
    gw: Gateway,
    sock: socket.socket,
    graceful_s: float,
    limits: HttpLimits,
    discovery: KubernetesDiscovery | None,
    autoscaling: AutoscalingSettings | None,
) -> None:
    """The gateway's app, with its replica discovery and (for a fleet Kubernetes scales
    from the published desired-replicas metric) its autoscaler alongside."""
    tasks = []
    if discovery is not None:
        tasks.append(asyncio.create_task(discovery.run(gw), name="discovery"))
        if autoscaling is not None:
            controller = FleetController(
                gw,
                ExternalScaler(gw, discovery),
                autoscaling.new_policy(),
                interval_s=autoscaling.interval_s,
                cold_start_estimate_s=autoscaling.cold_start_estimate_s,
            )
            tasks.append(asyncio.create_task(controller.run(), name="autoscaler"))
    try:
        await serve_app(create_app(gw), sock, graceful_s=graceful_s, limits=limits)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _run_backend(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`fleetserve gateway --backend NAME`: the fleet of `fleetserve serve --replicas`, its
    replicas' options from `--serve-config`, the door's from this command's flags."""
    try:
        options = resolve_options(argparse.Namespace(config=args.serve_config))
        options["model"] = args.model or options.get("model") or default_model()
        if args.tokenizer:
            options["tokenizer"] = args.tokenizer
        # the replicas it starts honour the priority of the client's key class
        config = dataclasses.replace(config_from_args(args), forward_priority=True)
        api_keys = api_keys_from_args(args)
        regions = regions_from_args(args)
        check_peer_key(regions, api_keys)
        autoscaling = autoscaling_from_args(args)
        if autoscaling is not None:
            num = autoscaling.initial_replicas(args.replicas)
        else:
            num = 1 if args.replicas is None else args.replicas
            if num < 1:
                raise ValueError(f"--replicas must be >= 1 without autoscaling, got {num}")
        if args.replica_max_failures < 1:
            raise ValueError(
                f"--replica-max-failures must be >= 1, got {args.replica_max_failures}"
            )
        plan = FleetPlan(
            options=options,
            config=config,
            api_keys=api_keys,
            num=num,
            autoscaling=autoscaling,
            host=args.host,
            port=args.port,
            drain_s=args.drain_timeout,
            limits=HttpLimits.from_options(vars(args)),
            max_failures=args.replica_max_failures,
            log_level=getattr(args, "log_level", "INFO"),
            backend=args.backend,
            backend_options=backend_options_from_args(args),
            regions=regions,
        )
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    return run_fleet(plan, args)
