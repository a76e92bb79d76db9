"""A replica's life: 503 while loading, SIGTERM drains (in-flight requests finish, new ones
get 503, exit 0), 429 when the queue is full, and a killed engine process (in-flight requests
get an error, /health 503, the server exits non-zero). Plus the CLI's option handling."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from gateway_harness import wait_until

from fleetserve import options as serve_options
from fleetserve.server import cli
from fleetserve.testing.launcher import ReplicaProcess

MODEL = "llama"
SERVER_ARGS = ("--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "64MiB")
LONG = {"max_tokens": 480, "ignore_eos": True}
# On the 16,384-position copy: a stream that is still running whatever the engine's speed.
LONGER = {"max_tokens": 16000, "ignore_eos": True}


class StreamInThread:
    """Consume one streaming completion in a thread, recording what arrived."""

    def __init__(self, url: str, **body) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        self.body = body
        self.tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason = None
        self.error: Exception | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            stream = self.client.completions.create(model=MODEL, stream=True, **self.body)
            for chunk in stream:
                for choice in chunk.choices:
                    self.tokens += len(choice.token_ids or [])
                    self.token_ids += choice.token_ids or []
                    self.finish_reason = choice.finish_reason or self.finish_reason
                self.first.set()
        except Exception as exc:  # noqa: BLE001 - recorded for the test to check
            self.error = exc
        finally:
            self.first.set()

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not end"


def engine_core_pid(replica: ReplicaProcess) -> int:
    match = wait_until(
        lambda: re.search(r"engine core process (\d+) started", replica.log()),
        what="the engine core's pid in the log",
    )
    return int(match.group(1))


def test_loading_503_then_sigterm_drains(tiny_llama, tmp_path):
    replica = ReplicaProcess(
        tiny_llama, *SERVER_ARGS, "--drain-timeout", "60", log_path=tmp_path / "drain.log"
    )
    try:
        url = replica.wait_listening()
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "loading"
        live = httpx.get(url + "/health/live", timeout=30)  # alive while loading: no restart
        assert live.status_code == 200 and live.json()["status"] == "loading"
        assert r.headers["retry-after"]
        r = httpx.get(url + "/v1/models")  # not listed until it can be used
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading", r.text
        replica.wait_ready()
        assert httpx.get(url + "/v1/models").status_code == 200

        stream = StreamInThread(url, prompt="hello", extra_body={"return_token_ids": True, **LONG})
        assert stream.first.wait(30) and stream.error is None
        replica.signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(url + "/health").status_code == 503, what="/health 503")
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert httpx.get(url + "/health/live", timeout=30).status_code == 200  # draining: alive
        assert replica.proc.poll() is None, "exited before the stream finished"
        stream.join()
        assert stream.error is None
        assert stream.finish_reason == "length" and stream.tokens == LONG["max_tokens"]
        assert replica.wait(30) == 0
    finally:
        replica.stop()


def test_queue_full_429_and_engine_death(long_llama, tmp_path):
    replica = ReplicaProcess(
        long_llama, *SERVER_ARGS, "--max-num-seqs", "1", "--max-queue-len", "1",
        log_path=tmp_path / "death.log",
    )  # fmt: skip
    try:
        replica.wait_ready()
        url = replica.url
        running = StreamInThread(
            url, prompt="hello", extra_body={"return_token_ids": True, **LONGER}
        )
        assert running.first.wait(30) and running.error is None
        waiting: dict = {}

        def post_waiting() -> None:
            body = {"model": MODEL, "prompt": "queued", "max_tokens": 4}
            waiting["response"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        waiter = threading.Thread(target=post_waiting, daemon=True)
        waiter.start()
        wait_until(
            lambda: (
                "fleetserve:num_requests_waiting{" in (text := httpx.get(url + "/metrics").text)
                and re.search(r"^fleetserve:num_requests_waiting\{.*\} 1\.0$", text, re.MULTILINE)
            ),
            what="one request waiting",
        )
        r = httpx.post(url + "/v1/completions", json={"prompt": "one too many"})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1

        os.kill(engine_core_pid(replica), signal.SIGKILL)
        wait_until(lambda: httpx.get(url + "/health").status_code == 503, what="/health 503")
        # dead: a liveness probe restarts it (once the engine client notices, a poll later)
        live = wait_until(
            lambda: (r := httpx.get(url + "/health/live")).status_code == 503 and r,
            what="/health/live 503",
        )
        assert live.json()["error"]["code"] == "dead", live.text
        running.join()
        assert isinstance(running.error, openai.APIError), running.error
        assert running.finish_reason is None
        waiter.join(30)
        assert waiting["response"].status_code == 503
        assert waiting["response"].json()["error"]["code"] == "engine_dead"
        assert replica.wait(30) != 0
    finally:
        replica.stop()


def test_unloadable_model_exits_non_zero(tmp_path):
    missing = tmp_path / "no-such-model"
    replica = ReplicaProcess(missing, *SERVER_ARGS, log_path=tmp_path / "bad.log")
    try:
        assert replica.wait(120) == 1
        assert "could not start the engine" in replica.log()
    finally:
        replica.stop()


# ---- CLI ------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    from fleetserve.cli import build_parser

    return build_parser(["serve", *argv]).parse_args(["serve", *argv])


def test_every_engine_field_is_a_flag():
    from fleetserve.engine.config import EngineConfig

    out = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "serve", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for name in EngineConfig.field_names():
        if name != "model":
            assert "--" + name.replace("_", "-") in out.stdout, name
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--config"):
        assert flag in out.stdout


def test_config_file_and_precedence(tmp_path, monkeypatch):
    config = tmp_path / "replica.yaml"
    config.write_text("max-model-len: 128\nkv_cache_memory: 2GiB\nport: 9000\nmodel: /m\n")
    monkeypatch.delenv(serve_options.API_KEY_ENV, raising=False)
    options = serve_options.resolve_options(parse("--config", str(config), "--port", "9001"))
    assert options["max_model_len"] == 128
    assert options["kv_cache_memory"] == 2 * 2**30
    assert options["port"] == 9001  # the command line wins
    assert options["model"] == "/m"
    monkeypatch.setenv(serve_options.API_KEY_ENV, "from-env")
    assert serve_options.resolve_options(parse())["api_key"] == "from-env"
    assert serve_options.resolve_options(parse("--api-key", "flag"))["api_key"] == "flag"
    settings = cli.build_settings(
        serve_options.resolve_options(parse("/x/SmolLM2-135M-Instruct.Q4_1.gguf"))
    )
    assert settings.served_model_name == "SmolLM2-135M-Instruct"
    assert settings.engine.model == "/x/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert settings.engine.max_num_batched_tokens == 1024  # the server's own default
    given = serve_options.resolve_options(parse("/m", "--max-num-batched-tokens", "4096"))
    assert cli.build_settings(given).engine.max_num_batched_tokens == 4096


def test_door_options_from_flags_config_and_env(tmp_path, monkeypatch):
    from fleetserve.http_limits import HttpLimits

    monkeypatch.delenv(serve_options.API_KEY_ENV, raising=False)
    monkeypatch.delenv(serve_options.OPERATOR_KEY_ENV, raising=False)
    defaults = cli.build_settings(serve_options.resolve_options(parse("/m")))
    assert defaults.allow_client_priority is False
    assert defaults.operator_key is None
    assert defaults.http == HttpLimits()
    assert (defaults.max_prompts_per_request, defaults.max_choices_per_request) == (256, 256)
    config = tmp_path / "replica.yaml"
    config.write_text(
        "allow-client-priority: true\noperator-key: op-from-file\nmax-prompts-per-request: 8\n"
        "max-choices-per-request: 16\nheader-timeout: 2.5\nmax-header-bytes: 4096\n"
    )
    settings = cli.build_settings(
        serve_options.resolve_options(parse("/m", "--config", str(config)))
    )
    assert settings.allow_client_priority is True
    assert settings.operator_key == "op-from-file"
    assert (settings.max_prompts_per_request, settings.max_choices_per_request) == (8, 16)
    assert settings.http.header_timeout == 2.5 and settings.http.max_header_bytes == 4096
    flags = parse(
        "/m", "--config", str(config), "--no-allow-client-priority", "--body-timeout", "5"
    )
    settings = cli.build_settings(serve_options.resolve_options(flags))
    assert settings.allow_client_priority is False and settings.http.body_timeout == 5
    monkeypatch.setenv(serve_options.OPERATOR_KEY_ENV, "op-from-env")
    assert (
        cli.build_settings(serve_options.resolve_options(parse("/m"))).operator_key == "op-from-env"
    )
    with pytest.raises(ValueError, match="operator_key must differ"):
        cli.build_settings(serve_options.resolve_options(parse("/m", "--api-key", "op-from-env")))
    with pytest.raises(ValueError, match="max_prompts_per_request"):
        cli.build_settings(
            serve_options.resolve_options(parse("/m", "--max-prompts-per-request", "0"))
        )
    with pytest.raises(ValueError, match="header_timeout"):
        HttpLimits(header_timeout=0)


def test_open_server_beyond_loopback_warns(caplog):
    settings = cli.build_settings(serve_options.resolve_options(parse("/m")))
    keyed = cli.build_settings(serve_options.resolve_options(parse("/m", "--operator-key", "k")))
    assert not cli.warn_if_open(settings, "127.0.0.1")
    assert not cli.warn_if_open(settings, "::1")
    assert not cli.warn_if_open(keyed, "0.0.0.0")
    with caplog.at_level("WARNING"):
        assert cli.warn_if_open(settings, "0.0.0.0")
    assert "--api-key" in caplog.text


def test_config_file_unknown_key_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_model_len: 128\nmax_modle_len: 64\n")
    out = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "max_modle_len" in out.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [("4GiB", 4 * 2**30), ("512M", 512 * 2**20), ("1000", 1000), ("1.5k", 1536)],
)
def test_parse_size(value, expected):
    assert serve_options.parse_size(value) == expected


def test_served_name():
    assert (
        serve_options.served_name("/a/b/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    )
    assert serve_options.served_name("/a/b/model.gguf") == "model"
    assert serve_options.served_name("/ckpt/Llama-3.2-1B/") == "Llama-3.2-1B"
