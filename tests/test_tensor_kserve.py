"""The KServe v2 body codec with plain bytes: JSON tensors, the binary-data extension, and
malformed bodies refused with a message that names the problem."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fleetserve.tensor.handlers import BadInput
from fleetserve.tensor.kserve import decode_request, encode_response


def binary_body(header: dict, *chunks: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), str(len(head))


def test_json_tensors_decode_to_shaped_arrays():
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]},
                {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "é"]},
            ]
        }
    ).encode()
    _, tensors = decode_request(body, None)
    assert tensors["x"].dtype == np.float32 and tensors["x"].tolist() == [[1, 2], [3, 4]]
    assert tensors["t"].tolist() == [b"a", "é".encode()]


def test_binary_inputs_in_order_and_bytes_with_length_prefixes():
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    words = b"".join(struct.pack("<I", len(w)) + w for w in (b"hi", b"", b"there"))
    header = {
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "INT64",
             "parameters": {"binary_data_size": x.nbytes}},
            {"name": "w", "shape": [3], "datatype": "BYTES",
             "parameters": {"binary_data_size": len(words)}},
        ]
    }  # fmt: skip
    body, length = binary_body(header, x.tobytes(), words)
    _, tensors = decode_request(body, length)
    assert np.array_equal(tensors["x"], x)
    assert tensors["w"].tolist() == [b"hi", b"", b"there"]


@pytest.mark.parametrize(
    ("inputs", "extra", "says"),
    [
        ([{"name": "x", "shape": [2], "datatype": "FP32",
           "parameters": {"binary_data_size": 12}}], b"\0" * 12, "needs 8"),
        ([{"name": "x", "shape": [1], "datatype": "FP32",
           "parameters": {"binary_data_size": 4}}], b"\0" * 6, "2 bytes of binary data"),
        ([{"name": "w", "shape": [1], "datatype": "BYTES",
           "parameters": {"binary_data_size": 6}}], struct.pack("<I", 9) + b"ab", "runs past"),
        ([{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}], b"", "non-negative"),
        ([{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}], b"", "unknown datatype"),
        ([{"name": "x", "shape": [1], "datatype": "INT8", "data": [1000]}], b"", "does not fit"),
        ([{"name": "x", "shape": [1], "datatype": "FP32", "data": ["1"]}], b"", "numbers"),
        ([{"name": "x", "shape": [1], "datatype": "FP32"}], b"", "neither 'data'"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_named(inputs, extra, says):
    body, length = binary_body({"inputs": inputs}, extra)
    with pytest.raises(BadInput, match=says):
        decode_request(body, length)


def test_header_length_that_does_not_fit_is_refused():
    with pytest.raises(BadInput, match="does not fit"):
        decode_request(b"{}", "99")
    with pytest.raises(BadInput, match="not JSON"):
        decode_request(b"\xff\xfe", None)


def test_response_json_or_binary_as_asked_and_unknown_outputs_refused():
    outputs = {"y": np.array([[1.5, 2.5]], dtype=np.float32), "label": np.array([b"pos"], object)}
    body, headers = encode_response("m", {"id": "r1"}, outputs)
    answer = json.loads(body)
    assert headers == {} and answer["id"] == "r1"
    assert answer["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [1, 2],
                                    "data": [1.5, 2.5]}  # fmt: skip
    assert answer["outputs"][1]["data"] == ["pos"]
    request = {"outputs": [{"name": "label", "parameters": {"binary_data": True}}]}
    body, headers = encode_response("m", request, outputs)
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    assert [o["name"] for o in header["outputs"]] == ["label"]
    assert body[n:] == struct.pack("<I", 3) + b"pos"
    with pytest.raises(BadInput, match="unknown output 'z'"):
        encode_response("m", {"outputs": [{"name": "z"}]}, outputs)


@pytest.mark.parametrize(
    ("shape", "datatype", "says"),
    [
        ([2**32, 2**32], "FP32", "can hold"),  # np.prod wraps this to 0
        ([2**62, 4], "INT8", "can hold"),
        ([10**6], "BYTES", "can hold"),
    ],
)
def test_a_shape_larger_than_the_body_could_hold_is_refused(shape, datatype, says):
    body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": []}]})
    with pytest.raises(BadInput, match=says):
        decode_request(body.encode(), None)
    binary = {"name": "x", "shape": shape, "datatype": datatype,
              "parameters": {"binary_data_size": 0}}  # fmt: skip
    body, length = binary_body({"inputs": [binary]})
    with pytest.raises(BadInput, match=says):
        decode_request(body, length)


def test_a_header_length_of_non_ascii_digits_is_refused():
    body, _ = binary_body(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
    )
    for length in ("²", "١٢", "⁵"):  # str.isdigit() is true for each, int() refuses them
        with pytest.raises(BadInput, match="does not fit"):
            decode_request(body, length)


def test_json_nested_too_deep_is_refused():
    data = "[" * 100_000 + "1" + "]" * 100_000
    body = '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + data + "}]}"
    with pytest.raises(BadInput, match="not JSON"):
        decode_request(body.encode(), None)


@pytest.mark.parametrize("parameters", [[1], "binary", 3])
def test_output_parameters_that_are_not_an_object_are_refused(parameters):
    outputs = {"x": np.array([1.0], dtype=np.float32)}
    request = {"outputs": [{"name": "x", "parameters": parameters}]}
    with pytest.raises(BadInput, match="parameters"):
        encode_response("m", request, outputs)
