"""The replica server takes its engine from a factory: here one that is not a model (it
answers every prompt with its own last token), behind the real routes, admission and
metrics, in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.testclient import TestClient
from gateway_harness import wait_until

from fleetserve.engine.config import EngineConfig
from fleetserve.engine.outputs import CompletionOutput, RequestOutput
from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.server.app import build_app
from fleetserve.server.state import ServerSettings


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class EchoEngine:
    """What the server needs of an engine, and nothing more: no process, no model."""

    max_model_len = 64
    vocab_size = 256
    block_size = 16

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.tokenizer = CharTokenizer()
        self.request_observers: list = []
        self.dead: str | None = None
        self.dead_event = asyncio.Event()
        self.num_in_flight = 0
        self.requests: list[tuple[list[int], SamplingParams]] = []

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def check_health(self) -> bool:
        return True

    def stats(self) -> dict:
        return {"num_running": 0}

    async def fresh_stats(self, timeout_s: float = 0.5) -> dict:
        return self.stats()

    def close_subscribers(self) -> None:
        pass

    async def generate(
        self, prompt, params: SamplingParams, request_id: str, priority: int = 0,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        ids = prompt_token_ids or list(prompt)
        self.requests.append((ids, params))
        choices = [
            CompletionOutput(i, text=chr(ids[-1]), token_ids=[ids[-1]], finish_reason="length")
            for i in range(params.n)
        ]
        yield RequestOutput(request_id, None, ids, choices, finished=True)


def test_the_server_serves_whatever_engine_its_factory_makes():
    settings = ServerSettings(engine=EngineConfig(model="not-loaded"), served_model_name="echo")
    made: list[EchoEngine] = []

    def factory(s: ServerSettings) -> EchoEngine:
        made.append(EchoEngine(s))
        return made[-1]

    with TestClient(build_app(settings, engine_factory=factory)) as client:
        # The engine "loads" in a background task.
        wait_until(lambda: client.get("/health").status_code == 200, what="/health 200")
        r = client.post(
            "/v1/completions",
            json={"model": "echo", "prompt": [72, 105], "max_tokens": 1, "n": 2,
                  "return_token_ids": True},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == ["i", "i"]
        assert made[0].settings is settings
        assert made[0].requests[0][0] == [72, 105] and made[0].requests[0][1].n == 2
        assert "fleetserve:engine_healthy" in client.get("/metrics").text
