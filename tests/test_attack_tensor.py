"""Hostile requests at a tensor-model replica (found by attacking it as an outside user):
each must get a 4xx naming what is wrong, and the replica keeps serving. Each test here
failed on main when it was written (a 500, or a worker that died without a word)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct

import httpx
import pytest
import torch
from gateway_harness import ThreadServer, wait_until
from tensor_models import build_bert, tiny_net

from fleetserve.tensor.app import build_app
from fleetserve.tensor.batcher import BatchConfig
from fleetserve.tensor.handlers import TensorHandler
from fleetserve.tensor.loading import LoadOptions
from fleetserve.tensor.state import TensorSettings
from fleetserve.tensor.workers import Workers

INFER = "/v2/models/tiny-net/infer"


def serve(settings: TensorSettings, **kwargs) -> ThreadServer:
    server = ThreadServer(build_app(settings, **kwargs)).start()
    wait_until(lambda: httpx.get(server.url + "/health").status_code == 200, 60, 0.05, "load")
    return server


@pytest.fixture(scope="module")
def tensor_url():
    net = tiny_net()
    settings = TensorSettings(
        model="tiny-net",
        served_model_name="tiny-net",
        batch=BatchConfig(max_batch_size=16, max_queue_delay_s=0.01),
    )
    server = serve(settings, handler_factory=lambda _: TensorHandler(net))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def text_url(tmp_path_factory):
    folder = build_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")
    settings = TensorSettings(
        model=str(folder),
        served_model_name="tiny-bert",
        load=LoadOptions(task="embed"),
        batch=BatchConfig(max_batch_size=8, max_queue_delay_s=0.01),
    )
    server = serve(settings)
    yield server.url
    server.stop()


def post(url: str, path: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


def still_serves(url: str) -> None:
    x = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
    assert post(url, INFER, json.dumps(x).encode()).status_code == 200


def one_input(**fields) -> dict:
    return {"inputs": [{"name": "input__0", **fields}]}


@pytest.mark.parametrize("shape", [[2**62, 4], [2**32, 2**32]])
def test_a_json_shape_whose_element_count_overflows_int64_is_a_400(tensor_url, shape):
    body = json.dumps(one_input(shape=shape, datatype="FP32", data=[])).encode()
    resp = post(tensor_url, INFER, body)
    assert resp.status_code == 400, resp.text
    assert "shape" in resp.json()["error"]
    still_serves(tensor_url)


def test_a_binary_shape_whose_element_count_wraps_to_zero_is_a_400(tensor_url):
    # 2**61 x 8 elements wrap to 0 in int64: the 0 bytes sent "match" it.
    header = json.dumps(
        one_input(shape=[2**61, 8], datatype="FP32", parameters={"binary_data_size": 0})
    ).encode()
    resp = post(tensor_url, INFER, header, {"Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 400, resp.text
    assert "shape" in resp.json()["error"]
    still_serves(tensor_url)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"inputs": [{"name": "input__0", "shape": [1], "datatype": "FP32", "data": '
        + b"[" * 5000
        + b"1"
        + b"]" * 5000
        + b"}]}",
    ],
    ids=["deep-body", "deep-data"],
)
def test_deeply_nested_json_is_a_400(tensor_url, body):
    resp = post(tensor_url, INFER, body)
    assert resp.status_code == 400, resp.text
    still_serves(tensor_url)


def test_an_output_whose_parameters_are_not_an_object_is_a_400(tensor_url):
    body = {
        **one_input(shape=[1, 4], datatype="FP32", data=[0.0] * 4),
        "outputs": [{"name": "output__0", "parameters": "binary"}],
    }
    resp = post(tensor_url, INFER, json.dumps(body).encode())
    assert resp.status_code == 400, resp.text
    assert "parameters" in resp.json()["error"]
    still_serves(tensor_url)


def raw_post(url: str, path: str, body: bytes, extra_header: bytes) -> bytes:
    """A request with a header value httpx will not send (a latin-1 byte)."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + extra_header + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_header_length_that_is_a_superscript_digit_is_a_400(tensor_url):
    # "\xb2" is "²" in latin-1: str.isdigit() says yes, int() refuses it.
    header = json.dumps(
        one_input(shape=[1, 4], datatype="FP32", parameters={"binary_data_size": 16})
    ).encode()
    body = header + struct.pack("<4f", 1, 2, 3, 4)
    answer = raw_post(tensor_url, INFER, body, b"Inference-Header-Content-Length: \xb2")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"Inference-Header-Content-Length" in answer
    still_serves(tensor_url)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/embeddings", b'{"input": "\\ud800"}'),
        ("/predict", b'{"inputs": ["\\udc00x"]}'),
        (
            "/v2/models/tiny-bert/infer",
            b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
            b'"data": ["\\ud800"]}]}',
        ),
    ],
    ids=["embeddings", "predict", "v2"],
)
def test_a_text_with_a_lone_surrogate_is_a_400(text_url, path, body):
    resp = post(text_url, path, body)
    assert resp.status_code == 400, resp.text
    ok = post(text_url, "/v1/embeddings", b'{"input": "hello"}')
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "delay_s, timeout_s", [(math.inf, math.inf), (1e10, 1e11)], ids=["inf", "past-TIMEOUT_MAX"]
)
def test_a_queue_delay_and_timeout_too_long_to_wait_are_refused_or_served(delay_s, timeout_s):
    """`--max-queue-delay-ms inf --request-timeout inf` (or values past threading's
    TIMEOUT_MAX) were accepted; the worker's Condition.wait then raised OverflowError, the
    worker thread died and the request was never answered."""
    try:
        config = BatchConfig(max_batch_size=4, max_queue_delay_s=delay_s, timeout_s=timeout_s)
    except ValueError:
        return  # refused at the door: fine
    handler = TensorHandler(tiny_net())
    workers = Workers(handler, config)
    workers.start()
    rows = [torch.zeros(4)]

    async def one() -> list:
        return await asyncio.wait_for(workers.infer(rows, handler.key(rows)), 10)

    try:
        outputs = asyncio.run(one())
        assert len(outputs) == 1
        assert workers.alive()
    finally:
        workers.stop()


def test_a_nan_drain_timeout_is_refused():
    """`--drain-timeout nan` passed `drain_timeout < 0`; SIGTERM's wait_for(idle, nan) then
    times out at once and the requests in flight are cut instead of drained."""
    with pytest.raises(ValueError, match="drain_timeout"):
        TensorSettings(model="m", served_model_name="m", drain_timeout=math.nan)
