"""The Open Inference Protocol (KServe v2) REST body codec, JSON tensors and the binary-data
extension that `tritonclient.http` uses by default. Pure: bytes and numpy in and out.

Binary extension: the `Inference-Header-Content-Length: N` header says the first N bytes are
the JSON header; the binary data of each input with `parameters.binary_data_size` follows in
input order. BYTES elements are `<u32 little-endian length><bytes>` in binary and strings in
JSON. Outputs are binary when the request's output asks `binary_data: true` or the request
sets `binary_data_output: true`.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from fleetserve.tensor.handlers import V2_TO_NUMPY, BadInput
from fleetserve.tensor.jsonout import dumps

HEADER_LENGTH = "inference-header-content-length"


def decode_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(the JSON header, input name -> array) of an infer request body."""
    if header_length is not None:
        # isdigit() alone accepts digits such as '²' that int() refuses
        digits = header_length.isascii() and header_length.isdigit()
        if not digits or int(header_length) > len(body):
            raise BadInput(f"Inference-Header-Content-Length {header_length!r} does not fit")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        json_part, binary = body, b""
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # too deeply nested
        raise BadInput(f"the body is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadInput("the body must be a JSON object with 'inputs'")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput("'inputs' must be a non-empty list of tensors")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        array, used = _decode_input(item, binary, offset, len(body))
        offset += used
        if item["name"] in tensors:
            raise BadInput(f"input {item['name']!r} is given twice")
        tensors[item["name"]] = array
    if offset != len(binary):
        raise BadInput(f"{len(binary) - offset} bytes of binary data belong to no input")
    return header, tensors


def _decode_input(item: Any, binary: bytes, offset: int, body_size: int) -> tuple[np.ndarray, int]:
    """(the array, binary bytes used) of one input. Every element takes at least one byte of
    the body (a JSON number or string, or a binary value), so a shape with more elements than
    the body has bytes is refused before anything is allocated or reshaped."""
    if not isinstance(item, dict):
        raise BadInput("each input must be an object with name, shape, datatype and data")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str):
        raise BadInput("an input has no 'name'")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if datatype not in V2_TO_NUMPY:
        raise BadInput(f"input {name!r}: unknown datatype {datatype!r}; one of {list(V2_TO_NUMPY)}")
    count = math.prod(shape)  # Python ints: np.prod wraps [2**32, 2**32] to 0
    if count > body_size:
        raise BadInput(
            f"input {name!r}: shape {shape} has {count} elements, more than a body of "
            f"{body_size} bytes can hold"
        )
    params = item.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadInput(f"input {name!r}: binary_data_size {size!r} exceeds the data sent")
        chunk = binary[offset : offset + size]
        if datatype == "BYTES":
            flat = _unpack_bytes(chunk, name)
        else:
            itemsize = np.dtype(V2_TO_NUMPY[datatype]).itemsize
            if size != count * itemsize:
                raise BadInput(
                    f"input {name!r}: {size} bytes for shape {shape} of {datatype} "
                    f"(needs {count * itemsize})"
                )
            flat = np.frombuffer(chunk, dtype=V2_TO_NUMPY[datatype])
        return _shaped(flat, shape, count, name), size
    data = item.get("data")
    if data is None:
        raise BadInput(f"input {name!r} has neither 'data' nor binary data")
    flat_list = _flatten(data)
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat_list):
            raise BadInput(f"input {name!r}: BYTES data must be strings")
        flat = np.array([x.encode() for x in flat_list], dtype=np.object_)
    else:
        if not all(isinstance(x, (int, float, bool)) for x in flat_list):
            raise BadInput(f"input {name!r}: {datatype} data must be numbers")
        try:
            flat = np.array(flat_list, dtype=V2_TO_NUMPY[datatype])
        except (OverflowError, ValueError) as exc:
            raise BadInput(f"input {name!r}: data does not fit {datatype}: {exc}") from None
    return _shaped(flat, shape, count, name), 0


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        out: list = []
        for x in data:
            out.extend(_flatten(x) if isinstance(x, list) else [x])
        return out
    return [data]


def _shaped(flat: np.ndarray, shape: list[int], count: int, name: str) -> np.ndarray:
    if flat.size != count:
        raise BadInput(f"input {name!r}: {flat.size} elements for shape {shape} ({count})")
    return flat.reshape(shape)


def _unpack_bytes(chunk: bytes, name: str) -> np.ndarray:
    items, pos = [], 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise BadInput(f"input {name!r}: a BYTES element's length is cut off")
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + length > len(chunk):
            raise BadInput(f"input {name!r}: a BYTES element runs past the data")
        items.append(chunk[pos : pos + length])
        pos += length
    return np.array(items, dtype=np.object_)


def _pack_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1).tolist():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def _datatype(array: np.ndarray) -> str:
    if array.dtype == np.object_:
        return "BYTES"
    return next(n for n, t in V2_TO_NUMPY.items() if np.dtype(t) == array.dtype)


def _flag(value: Any, where: str) -> bool:
    """A JSON boolean; the string "false" is not false (Triton refuses it too)."""
    if not isinstance(value, bool):
        raise BadInput(f"{where}: binary_data must be true or false, got {value!r}")
    return value


def encode_response(
    model_name: str, request: dict, outputs: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of an infer response with the outputs the request names (all
    when it names none); binary where it asks."""
    wanted = request.get("outputs")
    params = request.get("parameters") or {}
    binary_default = _flag(
        params.get("binary_data_output", False) if isinstance(params, dict) else False,
        "parameters.binary_data_output",
    )
    if isinstance(wanted, list) and wanted:
        selected = []
        for spec in wanted:
            name = spec.get("name") if isinstance(spec, dict) else None
            if name not in outputs:
                raise BadInput(f"unknown output {name!r}; this model has {sorted(outputs)}")
            spec_params = spec.get("parameters") or {}
            if not isinstance(spec_params, dict):
                raise BadInput(f"output {name!r}: 'parameters' must be an object")
            binary = _flag(spec_params.get("binary_data", binary_default), f"output {name!r}")
            selected.append((name, binary))
    else:
        selected = [(name, binary_default) for name in outputs]
    described, chunks = [], []
    for name, binary in selected:
        array = outputs[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": _datatype(array),
            "shape": list(array.shape),
        }
        if binary:
            raw = (
                _pack_bytes(array)
                if array.dtype == np.object_
                else np.ascontiguousarray(array).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif array.dtype == np.object_:
            entry["data"] = [x.decode() if isinstance(x, bytes) else x for x in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "outputs": described}
    if isinstance(request.get("id"), str):
        header["id"] = request["id"]
    json_part = dumps(header)  # NaN/Infinity as strings: valid JSON (jsonout.py)
    if not chunks:
        return json_part, {}
    return json_part + b"".join(chunks), {"Inference-Header-Content-Length": str(len(json_part))}
