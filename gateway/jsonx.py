"""JSON the way upstreams send it: orjson first, the standard library when orjson refuses valid JSON.

orjson rejects lone-surrogate escapes such as ``"\\ud800"`` (they cannot become UTF-8), though they
are valid JSON that Python's ``json`` and the SDKs accept. An upstream answer containing one must be
relayed, not turned into a 502 that counts against the circuit breaker. The fallback runs only when
orjson refused, so the usual path costs nothing extra.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

DecodeError = ValueError  # orjson.JSONDecodeError and json.JSONDecodeError both derive from it


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # raises json.JSONDecodeError (a ValueError) when really invalid


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: e.g. a lone surrogate in a string
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()
