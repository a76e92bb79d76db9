"""The `fleetserve` command. Each subcommand lives in its own package's `cli.py`, which
exposes `register(subparsers)`; this file only wires them together, and sends
`serve --replicas N` (N > 1) to the fleet, so the replica server and the fleet never import
each other (both read their options from `fleetserve.options`)."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys

# subcommand -> module that registers it. Imported lazily so `fleetserve bench` never
# pays for importing torch.
SUBCOMMANDS = {
    "serve": "fleetserve.server.cli",
    "gateway": "fleetserve.gateway.cli",
    "bench": "fleetserve.bench.cli",
    "simulate": "fleetserve.sim.cli",
    "profile": "fleetserve.perf.cli",
    "plan": "fleetserve.plan.cli",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    # No prefix matching (`--api-ke` for `--api-key`): an abbreviation is an error, so what
    # a flag means never depends on which other flags exist.
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="fleetserve",
        description="Serve AI models to many users at once: one replica, a gateway over many, "
        "and the tools to measure them.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False),
    )
    wanted = [a for a in argv if a in SUBCOMMANDS][:1] or list(SUBCOMMANDS)
    for name, module in SUBCOMMANDS.items():
        if name in wanted:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=_HELP[name])
    if "serve" in wanted:
        _add_fleet(sub.choices["serve"])
    return parser


def _add_fleet(serve: argparse.ArgumentParser) -> None:
    """`fleetserve serve --replicas N` (or with autoscaling, `--min-replicas`/`--max-replicas`):
    replicas behind one gateway on the public port."""
    from fleetserve.fleet.replicated import add_replicated_arguments, run_replicated, wants_fleet

    add_replicated_arguments(serve)
    run_one = serve.get_default("func")

    def run(args: argparse.Namespace) -> int:
        return run_replicated(args) if wants_fleet(args) else run_one(args)

    serve.set_defaults(func=run)


_HELP = {
    "serve": "serve a model over an OpenAI-compatible HTTP API",
    "gateway": "front several replicas with routing, failover and admission control",
    "bench": "load-test an OpenAI-compatible endpoint and report latency and throughput",
    "simulate": "run a bench workload against a simulated fleet (virtual time, cost model)",
    "profile": "measure the engine's step times and fit a cost model for fleetserve simulate",
    "plan": "the cheapest fleet per region and hour that meets TTFT/TPOT SLOs (simulated)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
