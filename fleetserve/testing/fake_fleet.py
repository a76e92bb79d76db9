"""The fleet's own serving code (`serve_fleet`: gateway, supervisor, local backend, and the
autoscaler when asked) over replicas that need no model, for tests that send signals, need a
crash loop or scale, and for the autoscaling benchmark:

    python -m fleetserve.testing.fake_fleet fake --token-delay 0.04       # 2 fake replicas
    python -m fleetserve.testing.fake_fleet crash                          # die at start
    python -m fleetserve.testing.fake_fleet fake --min-replicas 0 --max-replicas 4 \\
        --token-delay 0.02 --per-seq-delay 0.004 --load-delay 5            # autoscaled

The autoscaling flags are `fleetserve serve`'s (`--min-replicas`, `--max-replicas`,
`--target-concurrency`, ...; either bound turns the autoscaler on, and `--replicas` is then
the initial count, default max(min, 1)); `--drain` is the drain deadline of a scale-down as
of a stop. The replicas charge what `fleetserve.testing.fake_replica` charges (its
`--token-delay`, `--per-seq-delay`, `--prefill-s-per-token`, `--load-delay`). With an
operator key (`--operator-key` or `$FLEETSERVE_OPERATOR_KEY`) /metrics and /admin/replicas
can be read; clients stay anonymous.

It prints `fleet: URL` once the gateway listens, and exits with the fleet's status."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.fleet.local import LocalBackend
from fleetserve.fleet.options import add_autoscaling_arguments, autoscaling_from_args
from fleetserve.fleet.replicated import serve_fleet
from fleetserve.gateway.api_keys import with_operator_key
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.serve import quiet_http_client_logs, run
from fleetserve.gateway.tokenizer import TokenizerFiles
from fleetserve.http.sockets import bind
from fleetserve.options import OPERATOR_KEY_ENV
from fleetserve.testing.fake_replica import ByteTokenizer

CRASH = "import sys; print('ERROR loader: model.gguf is truncated', file=sys.stderr); sys.exit(3)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("replica", choices=["fake", "crash"])
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="replicas at start (default: 2; with autoscaling max(min, 1))",
    )
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument("--per-seq-delay", type=float, default=0.0)
    parser.add_argument("--prefill-s-per-token", type=float, default=0.0)
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--drain", type=float, default=30.0, help="drain deadline, seconds")
    parser.add_argument("--max-failures", type=int, default=2)
    parser.add_argument("--router", default="round_robin")
    parser.add_argument("--probe-interval", type=float, default=0.2)
    parser.add_argument("--operator-key", default=os.environ.get(OPERATOR_KEY_ENV))
    add_autoscaling_arguments(parser)
    return parser.parse_args(argv)


def replica_command(args: argparse.Namespace, port: int) -> list[str]:
    if args.replica == "crash":
        return [sys.executable, "-c", CRASH]
    return [sys.executable, "-m", "fleetserve.testing.fake_replica", "--port", str(port),
            "--token-delay", str(args.token_delay),
            "--per-seq-delay", str(args.per_seq_delay),
            "--prefill-s-per-token", str(args.prefill_s_per_token),
            "--load-delay", str(args.load_delay)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    quiet_http_client_logs()
    autoscaling = autoscaling_from_args(args)
    if autoscaling is not None:
        initial = autoscaling.initial_replicas(args.replicas)
    else:
        initial = 2 if args.replicas is None else args.replicas
    config = GatewayConfig(router=args.router, probe_interval_s=args.probe_interval)
    # The fake replicas tokenize bytes: the gateway needs the same to continue a stream.
    gw = Gateway(config, with_operator_key(None, args.operator_key), tokenizer=ByteTokenizer())
    sock = bind("127.0.0.1", 0)
    print(f"fleet: http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    fleet = serve_fleet(
        gw,
        LocalBackend(lambda port: replica_command(args, port)),
        initial,
        sock,
        None,
        TokenizerFiles(),
        args.drain,
        args.max_failures,
        backoff=lambda: RestartBackoff(base_s=0.05, max_s=0.1),
        autoscaling=autoscaling,
    )
    failure = run(fleet)
    if failure:
        print(f"fleet failed: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
