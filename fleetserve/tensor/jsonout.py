"""JSON bodies of the tensor routes, encoded once by pydantic's Rust serializer (10x the
standard library's `json.dumps` on a list of floats, no new dependency: FastAPI brings it).

JSON has no NaN or Infinity. A model may still answer them, so a non-finite float is written
as the string "NaN", "Infinity" or "-Infinity": the body stays valid JSON for any parser, and
numpy reads those strings back as the floats (`np.array(data, dtype=np.float32)`, which is
what tritonclient's `as_numpy` does). Triton writes bare NaN/Infinity tokens instead, which
strict JSON parsers refuse; the binary-data extension carries the exact bits either way.
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi import Response


def dumps(value: Any) -> bytes:
    """`value` (dicts, lists, strings, numbers, None) as JSON bytes, non-finite floats as
    strings."""
    return pydantic_core.to_json(value, inf_nan_mode="strings")


def json_response(value: Any, status_code: int = 200) -> Response:
    return Response(dumps(value), status_code=status_code, media_type="application/json")
