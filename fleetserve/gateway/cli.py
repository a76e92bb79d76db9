"""`fleetserve gateway --replica URL ...`: one front door for replicas that already run."""

from __future__ import annotations

import argparse
import logging
import os

from fleetserve.gateway.app import create_app
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.options import add_gateway_arguments, api_keys_from_args, config_from_args
from fleetserve.gateway.replica import ReplicaKind, check_replica_url
from fleetserve.gateway.serve import run, serve_app
from fleetserve.gateway.tokenizer import TokenizerFiles, load_tokenizer
from fleetserve.http.sockets import bind
from fleetserve.http_limits import HttpLimits, add_http_limit_arguments

logger = logging.getLogger(__name__)

UPSTREAM_KEY_ENV = "FLEETSERVE_UPSTREAM_API_KEY"  # the replicas' own API key, if they need one


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gateway",
        help="front several replicas with routing, failover and admission control",
        description="Front running replicas: routing policies, retries, mid-stream "
        "migration, health probes, circuit breakers, API keys and rate limits.",
        epilog="Example: fleetserve gateway --replica http://127.0.0.1:8001 "
        "--replica http://127.0.0.1:8002 --tokenizer MODEL --port 8000",
    )
    p.add_argument(
        "--replica",
        action="append",
        required=True,
        metavar="URL",
        help="a replica's base URL (repeat for each replica)",
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
    add_http_limit_arguments(p)
    p.set_defaults(func=main, _parser=p)


def quiet_http_client_logs() -> None:
    """httpx logs every request at INFO: far too much for a proxy."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    quiet_http_client_logs()
    kinds = args.replica_kind or ["fleetserve"]
    if len(kinds) not in (1, len(args.replica)):
        parser.error("give --replica-kind once, or once per --replica")
    if len(kinds) == 1:
        kinds = kinds * len(args.replica)
    try:
        config = config_from_args(args)
        api_keys = api_keys_from_args(args)
        limits = HttpLimits.from_options(vars(args))
        for url in args.replica:
            check_replica_url(url)
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        parser.error(f"cannot listen on {args.host}:{args.port}: {exc}")
    files = TokenizerFiles()
    try:
        tokenizer = load_tokenizer(args.tokenizer, files) if args.tokenizer else None
        gw = Gateway(config, api_keys, tokenizer, upstream_api_key=os.environ.get(UPSTREAM_KEY_ENV))
        for url, kind in zip(args.replica, kinds, strict=True):
            gw.add_replica(url, ReplicaKind(kind))
        print(
            f"fleetserve gateway: {len(args.replica)} replicas behind "
            f"http://{args.host}:{sock.getsockname()[1]} (router {config.router})",
            flush=True,
        )
        run(serve_app(create_app(gw), sock, graceful_s=args.drain_timeout, limits=limits))
    finally:
        files.cleanup()
    return 0
