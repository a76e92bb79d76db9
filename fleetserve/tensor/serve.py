"""`fleetserve serve MODEL` for a tensor model: settings from the resolved options, and the
app on uvicorn with the LLM replica's shutdown rules (`fleetserve.server.runner`)."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetserve.http.sockets import bind
from fleetserve.http_limits import HttpLimits
from fleetserve.options import served_name
from fleetserve.server.runner import serve as run_replica
from fleetserve.tensor.batcher import BatchConfig
from fleetserve.tensor.loading import LoadOptions
from fleetserve.tensor.state import TensorSettings


def build_settings(options: dict[str, Any], task: str) -> TensorSettings:
    model = options["model"]
    # net.pt -> net; a folder -> its name
    default_name = Path(model).stem if Path(model).is_file() else served_name(model)
    return TensorSettings(
        model=model,
        served_model_name=options.get("served_model_name") or default_name,
        load=LoadOptions(
            task=task,
            model_class=options.get("model_class"),
            trust_pickle=bool(options.get("trust_pickle")),
            quantization=options.get("quantization"),
        ),
        handler=options.get("handler"),
        batch=BatchConfig(
            max_batch_size=options["max_batch_size"],
            max_queue_delay_s=options["max_queue_delay_ms"] / 1000,
            max_queue_rows=max(options["max_queue_len"], options["max_batch_size"]),
            timeout_s=options["request_timeout"],
        ),
        instances=options["instances"],
        api_key=options.get("api_key") or None,
        operator_key=options.get("operator_key") or None,
        allow_client_priority=bool(options["allow_client_priority"]),
        drain_timeout=options["drain_timeout"],
        max_body_bytes=options["max_body_bytes"],
        health_timeout=options["health_timeout"],
        http=HttpLimits.from_options(options),
    )


def run(options: dict[str, Any], task: str, parser: argparse.ArgumentParser, log_level: str):
    """The command line's tensor path; returns the exit code."""
    if not options.get("model"):
        parser.error(f"--task {task} needs a MODEL")
    try:
        settings = build_settings(options, task)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    host, port = options["host"], options["port"]
    try:
        sock = bind(host, port)
    except OSError as exc:
        parser.error(f"cannot listen on {host}:{port}: {exc}")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{sock.getsockname()[1]}"
    print(f"fleetserve: listening on {url}; loading {settings.model} ({task}) ...", flush=True)

    def on_ready() -> None:
        route = "/v1/embeddings" if task == "embed" else "/predict"
        print(
            f"fleetserve: ready: {settings.served_model_name} at {url}{route} and "
            f"{url}/v2/models/{settings.served_model_name}/infer",
            flush=True,
        )

    return serve(settings, sock, on_ready=on_ready, log_level=log_level)


def serve(
    settings: TensorSettings,
    sock: socket.socket,
    on_ready: Callable[[], None] | None = None,
    log_level: str = "info",
) -> int:
    """Serve until drained or stopped (the LLM replica's runner, this app); returns the
    process exit code."""
    from fleetserve.tensor.app import build_app

    return run_replica(settings, sock, on_ready, log_level, app_factory=build_app)
