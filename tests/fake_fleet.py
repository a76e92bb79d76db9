"""The fleet's own serving code (`serve_fleet`: gateway, supervisor, local backend) over
replicas that need no model, for tests that send signals or need a crash loop:

    python tests/fake_fleet.py fake --token-delay 0.04    # fake replicas
    python tests/fake_fleet.py crash                       # replicas that die at start

It prints `fleet: URL` once the gateway listens, and exits with the fleet's status."""

from __future__ import annotations

import argparse
import logging
import sys

from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.fleet.local import LocalBackend
from fleetserve.fleet.replicated import serve_fleet
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.serve import run
from fleetserve.gateway.tokenizer import TokenizerFiles
from fleetserve.http.sockets import bind

CRASH = "import sys; print('ERROR loader: model.gguf is truncated', file=sys.stderr); sys.exit(3)"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("replica", choices=["fake", "crash"])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument("--drain", type=float, default=30.0)
    parser.add_argument("--max-failures", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    def command(port: int) -> list[str]:
        if args.replica == "crash":
            return [sys.executable, "-c", CRASH]
        return [sys.executable, "-m", "fleetserve.testing.fake_replica", "--port", str(port),
                "--token-delay", str(args.token_delay)]  # fmt: skip

    config = GatewayConfig(router="round_robin", probe_interval_s=0.2)
    gw = Gateway(config)
    sock = bind("127.0.0.1", 0)
    print(f"fleet: http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    fleet = serve_fleet(
        gw,
        LocalBackend(command),
        args.replicas,
        sock,
        None,
        TokenizerFiles(),
        args.drain,
        args.max_failures,
        backoff=lambda: RestartBackoff(base_s=0.05, max_s=0.1),
    )
    failure = run(fleet)
    if failure:
        print(f"fleet failed: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
