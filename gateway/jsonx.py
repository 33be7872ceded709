"""JSON the way upstreams send it: orjson first, the standard library when orjson refuses valid JSON.

orjson rejects lone-surrogate escapes such as ``"\\ud800"`` (they cannot become UTF-8), though they
are valid JSON that Python's ``json`` and the SDKs accept. An upstream answer containing one must be
relayed, not turned into a 502 that counts against the circuit breaker. The fallback runs only when
orjson refused, so the usual path costs nothing extra.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

DecodeError = ValueError  # orjson.JSONDecodeError and json.JSONDecodeError both derive from it


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # Only what orjson refuses but JSON allows: NaN/Infinity (not JSON) and numbers that overflow
        # to infinity are still refused, so no non-finite figure reaches usage or cost.
        return json.loads(data, parse_constant=_refuse, parse_float=_finite)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: e.g. a lone surrogate in a string
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()
