"""The OpenAI-compatible server on a tiny random Llama, through the real `openai` SDK and raw
HTTP: output equal to the offline `LLM` token for token, SSE framing, usage, error bodies,
disconnects, KV events, metrics, and a schemathesis fuzz run. One server for the module."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import httpx
import openai
import pytest
from gateway_harness import wait_until
from prometheus_client.parser import text_string_to_metric_families

from fleetserve import LLM, SamplingParams
from fleetserve.engine.block_hash import NONE_HASH, hash_block_chain
from fleetserve.testing.launcher import ReplicaProcess

API_KEY = "sk-test-0123456789"
MODEL = "llama"  # the served name of the tiny checkpoint folder
MAX_BODY = 64 * 1024
MAX_MODEL_LEN = 512
VOCAB = 512
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPERATOR_KEY = "op-test-9876543210"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}

METRIC_NAMES = [
    "fleetserve:num_requests_running",
    "fleetserve:num_requests_waiting",
    "fleetserve:num_requests_in_flight",
    "fleetserve:kv_cache_usage_perc",
    "fleetserve:prefix_cache_hit_rate",
    "fleetserve:prefix_cache_queries_total",
    "fleetserve:prefix_cache_hits_total",
    "fleetserve:num_preemptions_total",
    "fleetserve:prompt_tokens_total",
    "fleetserve:generation_tokens_total",
    "fleetserve:engine_healthy",
    "fleetserve:request_success_total",
    "fleetserve:time_to_first_token_seconds",
    "fleetserve:time_per_output_token_seconds",
    "fleetserve:e2e_request_latency_seconds",
    "fleetserve:request_queue_time_seconds",
]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("server_api") / "server.log"
    replica = ReplicaProcess(
        tiny_llama,
        "--api-key", API_KEY,
        "--operator-key", OPERATOR_KEY,
        "--allow-client-priority",
        "--dtype", "float32",
        "--max-body-bytes", str(MAX_BODY),
        "--max-num-seqs", "32",
        "--kv-cache-memory", "64MiB",
        "--num-threads", "1",
        log_path=log,
    )  # fmt: skip
    try:
        replica.loading_statuses = replica.wait_ready(timeout=300)
        yield replica
    finally:
        assert replica.stop() == 0, replica.log()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", max_model_len=MAX_MODEL_LEN, num_threads=1)


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


def random_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def scrape(url: str) -> dict[str, float]:
    """Sample name -> value (summed over labels) from /metrics."""
    values: dict[str, float] = {}
    metrics = httpx.get(url + "/metrics", headers=OPERATOR).text
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- equivalence with the offline engine -------------------------------------------------


def test_health_was_503_while_loading(server):
    assert server.loading_statuses[-1] == 200
    assert 503 in server.loading_statuses


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert server.ready_line and MODEL in server.ready_line


def test_greedy_completions_equal_llm(client, llm):
    prompts = [random_prompt(seed, n) for seed, n in ((1, 5), (2, 37), (3, 90))]
    prompts += ["the model runs fast on a laptop", "hello"]
    expected = llm.generate(prompts, greedy(), use_tqdm=False)
    for prompt, want in zip(prompts, expected, strict=True):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
        choice = r.choices[0]
        assert choice.token_ids == want.outputs[0].token_ids
        assert choice.text == want.outputs[0].text
        assert choice.prompt_token_ids == want.prompt_token_ids
        assert choice.finish_reason == "length"
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == 12
        assert r.usage.total_tokens == len(want.prompt_token_ids) + 12


def test_greedy_streaming_equals_llm(client, llm):
    prompt = random_prompt(4, 20)
    want = llm.generate([prompt], greedy(16), use_tqdm=False)[0].outputs[0]
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )  # fmt: skip
    tokens, text, usage, reasons = [], "", None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            tokens += choice.token_ids
            text += choice.text
            reasons.append(choice.finish_reason)
    assert tokens == want.token_ids
    assert text == want.text
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert usage.prompt_tokens == 20 and usage.completion_tokens == 16


def test_async_concurrent_chat_equals_llm(server, llm):
    conversations = [
        [{"role": "user", "content": f"hello number {i}"}] for i in range(4)
    ] + [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is the "},
                                         {"type": "text", "text": "capital of France"}]},
        ]
    ]  # fmt: skip
    plain = [
        [{**m, "content": m["content"] if isinstance(m["content"], str) else
          "".join(p["text"] for p in m["content"])} for m in conv]
        for conv in conversations
    ]  # fmt: skip
    expected = [llm.chat(conv, greedy(10), use_tqdm=False)[0] for conv in plain]

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

        async def one(conv, stream: bool):
            kwargs = {"model": MODEL, "messages": conv, "max_completion_tokens": 10, **GREEDY}
            if not stream:
                r = await client.chat.completions.create(**kwargs)
                return r.choices[0].token_ids, r.choices[0].message.content
            tokens, text = [], ""
            async for chunk in await client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    tokens += choice.token_ids
                    text += choice.delta.content or ""
            return tokens, text

        async with client:
            return await asyncio.gather(
                *(one(conv, i % 2 == 0) for i, conv in enumerate(conversations))
            )

    for (tokens, text), want in zip(asyncio.run(run()), expected, strict=True):
        assert tokens == want.outputs[0].token_ids
        assert text == want.outputs[0].text


def test_n_and_multiple_prompts_usage(client):
    prompts = [random_prompt(5, 7), random_prompt(6, 9)]
    r = client.completions.create(
        model=MODEL, prompt=prompts, n=3, max_tokens=5, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert all(len(c.token_ids) == 5 for c in r.choices)
    for c in r.choices:
        assert c.prompt_token_ids == prompts[c.index // 3]
    assert r.usage.prompt_tokens == 16
    assert r.usage.completion_tokens == 30
    again = client.completions.create(
        model=MODEL, prompt=prompts, n=3, max_tokens=5, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in r.choices]


def test_stop_string_is_excluded(client, llm):
    prompt = random_prompt(8, 10)
    full = llm.generate([prompt], greedy(20), use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip() or "\ufffd" in stop:
        pytest.skip("random text has no usable stop string")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_echo_and_logprobs(client):
    prompt = random_prompt(9, 6)
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=2, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 7
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        logprobs=True, top_logprobs=3, temperature=0,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 for c in content)
    # Greedy: the chosen token is the most likely one.
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


# ---- raw HTTP: SSE framing, ids, errors ----------------------------------------------------


def test_sse_chunks_are_well_formed(server):
    body = {
        "model": MODEL, "prompt": "hello", "max_tokens": 6, "stream": True, "n": 2,
        "ignore_eos": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    *choices_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    finished = [ch["index"] for c in choices_chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_request_id_is_echoed(server):
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
        headers={**AUTH, "X-Request-Id": "trace-42"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"] == "cmpl-trace-42"
    generated = httpx.get(server.url + "/health").headers["x-request-id"]
    assert len(generated) == 32


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"prompt": [1, 2, VOCAB]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": list(range(3, 3 + MAX_MODEL_LEN))}, "prompt"),
        ({"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
        ({}, "prompt"),
    ],
)
def test_400_names_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, headers=AUTH)
    assert_error(r, 400, param)


def test_400_chat_and_bad_json(server):
    url = server.url + "/v1/chat/completions"
    assert_error(httpx.post(url, json={"messages": []}, headers=AUTH), 400, "messages")
    bad_part = {"messages": [{"role": "user", "content": [{"type": "image_url", "x": 1}]}]}
    assert_error(httpx.post(url, json=bad_part, headers=AUTH), 400)
    many = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}
    assert_error(httpx.post(url, json=many, headers=AUTH), 400, "max_completion_tokens")
    r = httpx.post(url, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400)


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_client_priority_with_the_flag_is_bounded(server):
    # This replica runs with --allow-client-priority (as behind a gateway).
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for priority in (-(2**31), -3, 7, 2**31 - 1):
        r = httpx.post(server.url + "/v1/completions", json={**body, "priority": priority},
                       headers=AUTH)  # fmt: skip
        assert r.status_code == 200, r.text
    for priority in (-(2**31) - 1, 2**31, 10**30):
        r = httpx.post(server.url + "/v1/completions", json={**body, "priority": priority},
                       headers=AUTH)  # fmt: skip
        assert_error(r, 400, "priority")


def test_401_without_or_with_wrong_key(server):
    body = {"model": MODEL, "prompt": "hi"}
    url = server.url + "/v1/completions"
    assert assert_error(httpx.post(url, json=body), 401)["code"] == "invalid_api_key"
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": API_KEY}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_404_unknown_model_and_route(server):
    r = httpx.post(
        server.url + "/v1/completions", json={"model": "nope", "prompt": "hi"}, headers=AUTH
    )
    assert assert_error(r, 404, "model")["code"] == "model_not_found"
    assert_error(httpx.get(server.url + "/v1/models/nope", headers=AUTH), 404)
    assert_error(httpx.get(server.url + "/v2/nothing", headers=AUTH), 404)


def test_413_body_over_limit(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY + 100)})
    r = httpx.post(
        server.url + "/v1/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert assert_error(r, 413)["code"] == "request_too_large"

    def chunked():
        yield body[: MAX_BODY // 2].encode()
        yield body[MAX_BODY // 2 :].encode()

    r = httpx.post(
        server.url + "/v1/completions",
        content=chunked(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert_error(r, 413)


# ---- engine side effects -----------------------------------------------------------------


def test_client_disconnect_aborts_and_frees_blocks(server):
    before = scrape(server.url)
    max_tokens = MAX_MODEL_LEN - 20
    body = {
        "model": MODEL, "prompt": random_prompt(10, 10), "max_tokens": max_tokens,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60
    ) as r:
        # Hold on to the iterator: a dropped httpx line iterator closes the connection.
        lines = r.iter_lines()
        received = 0
        while received < 3:
            received += next(lines).startswith("data: ")
        running = scrape(server.url)
        assert running["fleetserve:num_requests_running"] == 1
        assert running["fleetserve:kv_cache_usage_perc"] > 0
    # Leaving the block closes the connection mid-stream.
    after = wait_until(
        lambda: (
            (m := scrape(server.url))["fleetserve:num_requests_running"] == 0
            and m["fleetserve:kv_cache_usage_perc"] == 0
            and m["fleetserve:num_requests_in_flight"] == 0
            and m
        ),
        what="the aborted request to leave the engine",
    )
    assert after["fleetserve:num_requests_waiting"] == 0
    generated = (
        after["fleetserve:generation_tokens_total"] - before["fleetserve:generation_tokens_total"]
    )
    assert 3 <= generated < max_tokens


def test_non_streaming_disconnect_aborts(server):
    before = scrape(server.url)["fleetserve:generation_tokens_total"]
    # 32 choices of 492 tokens: 492 steps of 32 sequences, seconds even for the tiny model
    # (one choice of 492 tokens finished within the client's 0.3 s on a quiet machine).
    max_tokens, n = MAX_MODEL_LEN - 20, 32
    body = {"model": MODEL, "prompt": random_prompt(12, 10), "max_tokens": max_tokens,
            "n": n, "ignore_eos": True}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=0.3)
    after = wait_until(
        lambda: (
            (m := scrape(server.url))["fleetserve:num_requests_in_flight"] == 0
            and m["fleetserve:num_requests_running"] == 0
            and m
        ),
        what="the abandoned request to be aborted",
    )
    assert after["fleetserve:kv_cache_usage_perc"] == 0
    assert after["fleetserve:generation_tokens_total"] - before < n * max_tokens


def test_kv_events_stream(server, client):
    prompt = random_prompt(11, 40)  # two full blocks of 16
    want = hash_block_chain(prompt, 16)
    with httpx.stream(
        "GET",
        server.url + "/v1/kv_events?token_ids=true",
        headers=OPERATOR,
        timeout=httpx.Timeout(20.0),
    ) as r:
        assert r.status_code == 200
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        stored = []
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            message = json.loads(line.removeprefix("data: "))
            assert message["block_size"] == 16
            for event in message["events"]:
                assert event["kind"] in ("stored", "removed", "cleared")
                if event["kind"] == "stored" and want[0] in event["block_hashes"]:
                    stored.append(event)
            if stored:
                break
    event = stored[0]
    assert event["block_hashes"][:2] == want
    assert event["parent_hash"] == NONE_HASH
    assert event["token_ids"][:2] == [prompt[:16], prompt[16:32]]


def test_metrics_are_exported(server, client):
    client.completions.create(
        model=MODEL, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True}
    )
    text = httpx.get(server.url + "/metrics", headers=OPERATOR).text
    for name in METRIC_NAMES:
        assert name in text, name
    m = scrape(server.url)
    assert m["fleetserve:time_to_first_token_seconds_count"] >= 1
    assert m["fleetserve:time_per_output_token_seconds_count"] >= 1
    assert m["fleetserve:e2e_request_latency_seconds_count"] >= 1
    assert m["fleetserve:request_queue_time_seconds_count"] >= 1
    assert m["fleetserve:generation_tokens_total"] >= 4
    assert m["fleetserve:engine_healthy"] == 1


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Fuzz every operation in /openapi.json (examples + fuzzing): no 5xx."""
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
        "--phases", "examples,fuzzing", "--checks", "not_a_server_error",
        "--max-examples", "25", "--seed", "0", "--workers", "1",
        "--request-timeout", "60", "--exclude-path", "/v1/kv_events",
        "-H", f"Authorization: Bearer {OPERATOR_KEY}",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert httpx.get(server.url + "/health").status_code == 200
