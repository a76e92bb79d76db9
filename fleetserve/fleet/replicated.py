"""`fleetserve serve MODEL --replicas N`: N replica processes on free loopback ports, a
gateway on the public port, supervision, and a clean stop on SIGTERM.

Each replica runs the very command line it was given (`fleetserve serve MODEL ...`) minus
the options that belong to the fleet (--replicas, --host, --port, the gateway's flags, the
API key), plus `--host 127.0.0.1 --port P` and, unless given, `--num-threads` sharing the
CPU cores between replicas. The public API key (if any) is checked at the gateway, as a
client key (never an admin one: the admin routes need the operator key); the replicas get a
random internal key so that nothing else on the machine can reach them.
On SIGTERM the gateway stops taking requests and finishes those in flight, then every
replica is drained and stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys

from fleetserve.fleet.local import LocalBackend
from fleetserve.fleet.supervisor import Supervisor
from fleetserve.gateway.app import create_app
from fleetserve.gateway.cli import quiet_http_client_logs
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.options import (
    OPERATOR_KEY_ENV,
    add_gateway_arguments,
    api_keys_from_args,
    config_from_args,
)
from fleetserve.gateway.serve import bind, run, serve_app
from fleetserve.gateway.tokenizer import TokenizerFiles, load_tokenizer

logger = logging.getLogger(__name__)

API_KEY_ENV = "FLEETSERVE_API_KEY"  # what `fleetserve serve` reads its key from
# Options of `fleetserve serve` that the fleet consumes: never passed on to a replica.
FLEET_OPTIONS = {
    "--replicas",
    "--host",
    "--port",
    "--router",
    "--api-keys-file",
    "--gateway-config",
    "--api-key",
    "--operator-key",
}


def add_replicated_arguments(parser: argparse.ArgumentParser) -> None:
    """`--replicas` and the gateway's options, for `fleetserve serve`."""
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="replica processes behind one gateway on --port (default: 1, no gateway)",
    )
    add_gateway_arguments(parser, tuning=False)


def replica_argv(argv: list[str]) -> list[str]:
    """`argv` (the full fleetserve command line, `serve` included) without the fleet's
    options, in both `--opt value` and `--opt=value` forms."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in FLEET_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def run_replicated(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Entry point for `fleetserve serve --replicas N` (N >= 2). `argv` defaults to
    `sys.argv[1:]`. Returns the process exit code."""
    from fleetserve.server.cli import default_model, resolve_options

    quiet_http_client_logs()
    options = resolve_options(args)
    num = int(getattr(args, "replicas", 1))
    try:
        config = config_from_args(args)
        api_keys = api_keys_from_args(args, public_key=options.get("api_key"))
    except (ValueError, TypeError, OSError) as exc:  # e.g. an admin key that is a client key
        print(f"fleetserve: {exc}", file=sys.stderr)
        return 2
    model = options.get("model") or default_model()
    tokenizer_path = options.get("tokenizer") or model
    child_argv = replica_argv(sys.argv[1:] if argv is None else argv)
    if options.get("num_threads") is None:
        threads = max(1, (os.cpu_count() or 1) // num)
        child_argv += ["--num-threads", str(threads)]
    internal_key = secrets.token_urlsafe(24)
    env = {**os.environ, API_KEY_ENV: internal_key}
    env.pop(OPERATOR_KEY_ENV, None)  # the gateway's alone: no replica needs it

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "fleetserve.cli", *child_argv,
                "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip

    sock = bind(options["host"], options["port"])
    url = f"http://{options['host']}:{sock.getsockname()[1]}"
    print(f"fleetserve: gateway on {url}; starting {num} replicas of {model} ...", flush=True)
    files = TokenizerFiles()
    try:
        run(_serve(config, api_keys, internal_key, num, command, env, sock, tokenizer_path, files))
    finally:
        files.cleanup()
    return 0


async def _serve(config, api_keys, internal_key, num, command, env, sock, tokenizer_path, files):
    gw = Gateway(config, api_keys, upstream_api_key=internal_key)
    backend = LocalBackend(command, env, health_headers={"Authorization": f"Bearer {internal_key}"})
    supervisor = Supervisor(backend, gw, num)
    supervisor.start()
    tokenizer = asyncio.create_task(_load_tokenizer(gw, tokenizer_path, files))
    try:
        await serve_app(create_app(gw), sock)
    finally:
        logger.info("stopping %d replicas", num)
        tokenizer.cancel()
        await supervisor.stop()
        await asyncio.gather(tokenizer, return_exceptions=True)
    print("fleetserve: stopped", flush=True)


async def _load_tokenizer(gw: Gateway, path: str, files: TokenizerFiles) -> None:
    try:
        gw.set_tokenizer(await asyncio.to_thread(load_tokenizer, path, files))
        logger.info("gateway tokenizer loaded: prefix-aware routing on")
    except (OSError, ValueError) as exc:
        logger.warning("no gateway tokenizer (%s): routing without prompt prefixes", exc)
    except Exception:  # a broken tokenizer must not take the fleet down
        logger.exception("could not load the gateway tokenizer")


def main(argv: list[str] | None = None) -> int:
    """`python -m fleetserve.fleet.replicated serve MODEL --replicas N ...`: the same as
    `fleetserve serve ... --replicas N`, whether or not the serve command registers the
    fleet's options itself."""
    from fleetserve.cli import build_parser

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    serve = next(
        a.choices["serve"] for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    if not any(action.dest == "replicas" for action in serve._actions):
        add_replicated_arguments(serve)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_replicated(args, argv)


if __name__ == "__main__":
    sys.exit(main())
