"""`fleetserve serve [MODEL]`: one replica, an OpenAI-compatible HTTP API. Its options live
in `fleetserve.options` (shared with the fleet); `fleetserve.cli` hands `--replicas N` to
`fleetserve.fleet.replicated`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
from typing import Any

from fleetserve.engine.config import EngineConfig
from fleetserve.http.sockets import bind
from fleetserve.options import (
    SERVER_ENGINE_DEFAULTS,
    add_serve_arguments,
    default_model,
    engine_fields,
    resolve_options,
    served_name,
)
from fleetserve.tensor.task import resolve_task

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve one model over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics). The engine core runs in its "
        "own process. SIGTERM drains: new requests get 503, requests in flight finish.",
        epilog="Example: fleetserve serve --port 8000 --max-model-len 2048",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run, _parser=p)


def build_settings(options: dict[str, Any]):
    from fleetserve.http_limits import HttpLimits
    from fleetserve.server.state import ServerSettings

    model = options.get("model") or default_model()
    engine_kwargs = dict(SERVER_ENGINE_DEFAULTS)
    engine_kwargs.update({n: options[n] for n, _ in engine_fields() if n in options})
    engine = EngineConfig(model=model, **engine_kwargs)
    return ServerSettings(
        engine=engine,
        served_model_name=options.get("served_model_name") or served_name(model),
        api_key=options.get("api_key") or None,
        operator_key=options.get("operator_key") or None,
        allow_client_priority=bool(options["allow_client_priority"]),
        max_queue_len=options["max_queue_len"],
        max_prompts_per_request=options["max_prompts_per_request"],
        max_choices_per_request=options["max_choices_per_request"],
        drain_timeout=options["drain_timeout"],
        max_body_bytes=options["max_body_bytes"],
        health_timeout=options["health_timeout"],
        http=HttpLimits.from_options(options),
    )


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    try:
        options = resolve_options(args)
        task = resolve_task(options.get("task"), options.get("model"))
        if task != "generate":  # a tensor model: /predict, /v1/embeddings, KServe v2
            from fleetserve.tensor import serve as tensor_serve

            return tensor_serve.run(options, task, parser, args.log_level)
        settings = build_settings(options)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    from fleetserve.server import runner

    host, port = options["host"], options["port"]
    try:
        sock = bind(host, port)
    except OSError as exc:
        parser.error(f"cannot listen on {host}:{port}: {exc}")
    url = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    warn_if_open(settings, host)
    print(f"fleetserve: listening on {url}; loading {settings.engine.model} ...", flush=True)

    def on_ready() -> None:
        print(ready_message(url, settings), flush=True)

    return runner.serve(settings, sock, on_ready=on_ready, log_level=args.log_level)


def warn_if_open(settings, host: str) -> bool:
    """Log a warning if a server with no key at all listens beyond loopback; True if so."""
    if settings.api_key or settings.operator_key or _is_loopback(host):
        return False
    logger.warning(
        "no --api-key nor --operator-key: anyone who can reach %s may generate, and read "
        "/metrics and the KV events (other clients' prompt blocks); set keys when listening "
        "beyond loopback",
        host,
    )
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def ready_message(url: str, settings) -> str:
    body = json.dumps(
        {
            "model": settings.served_model_name,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
        }
    )
    auth = ' -H "Authorization: Bearer $FLEETSERVE_API_KEY"' if settings.api_key else ""
    return (
        f"fleetserve: ready: {settings.served_model_name} at {url}/v1\n"
        f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{body}'"
    )
