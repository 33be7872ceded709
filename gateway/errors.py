"""Every failure the gateway reports, mapped to OpenAI's error shape in one place.

    GatewayError                      status  type                   code
    ├── InvalidRequest                400     invalid_request_error  (given)
    ├── AuthenticationFailed          401     authentication_error   invalid_api_key
    ├── PermissionDenied              403     permission_error       (given)
    ├── NotFound                      404     invalid_request_error  (given, e.g. model_not_found)
    ├── RequestTooLarge               413     invalid_request_error  request_too_large
    ├── RateLimited                   429     rate_limit_error       rate_limit_exceeded
    ├── QuotaExceeded                 429     insufficient_quota     insufficient_quota
    ├── ServiceUnavailable            503     service_unavailable    (given)
    ├── UpstreamError                 502/503/504 upstream_error     (given)
    └── PassThroughError              the upstream's 4xx, normalised to OpenAI's shape

Internal failures, never shown to a client as they are (the router turns them into the errors above):

    AttemptFailed                     one upstream attempt failed: retry, or fall back to the next target
    ├── UpstreamTimeout               no (first) byte in time
    ├── UpstreamConnectError          the upstream could not be reached
    ├── UpstreamStatus                an answer with a status that means "try elsewhere" (5xx, 3xx, 401…)
    │   └── UpstreamThrottled         429
    └── UpstreamBadAnswer             a 200 that is not an answer (``BadAnswer`` says how)
    UpstreamLimited                   a target's gateway-wide limit is reached (gateway.limits.upstream)

aiohttp's errors become ``AttemptFailed`` in ``gateway.relay``; the store's are translated to
``gateway.state.base.StoreError`` in the store backends.

Messages are written by the gateway and never contain secrets or upstream stack traces. The native
API (``/api/v1``) shows the same errors in its own shape (``native_body``): same status and ``code``,
with the platform's ``LLMErrorType``:

    CONTEXT_LENGTH   400 context_length_exceeded     MODEL_NOT_FOUND  404
    INVALID_REQUEST  other 4xx (400 401 403 405 413) RATE_LIMIT       429 (limits and budgets)
                                                     PROVIDER_ERROR   502 503
    TIMEOUT          504                             UNKNOWN          anything else (500)
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import orjson
from aiohttp import web

from gateway.logging import REDACTOR

JSON = "application/json"


class GatewayError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def to_response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body(), content_type=JSON, headers=self.headers)

    def to_native_response(self, request_id: str, provider: str | None) -> web.Response:
        body = native_body(self.status, self.message, self.code, request_id, provider)
        return web.Response(status=self.status, body=body, content_type=JSON, headers=self.headers)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.headers.setdefault("Retry-After", str(max(1, int(retry_after + 0.999))))


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    default_code = "insufficient_quota"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class Outcome(StrEnum):
    """How one upstream attempt ended (the ``outcome`` label of ``llm_gateway_upstream_requests``;
    an ``UpstreamStatus`` adds ``status_<code>``)."""

    SUCCESS = "success"
    CLIENT_ERROR = "client_error"  # the upstream refused the request itself (relayed 4xx)
    RETRY_BUDGET = "retry_budget"  # a retry the retry budget did not allow
    GATEWAY_LIMITED = "gateway_limited"  # skipped: the target's gateway-wide limit is reached
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"


class BadAnswer(StrEnum):
    TOO_LARGE = "too_large"
    NOT_JSON = "bad_response"
    ERROR_IN_BODY = "body_error"
    ERROR_EVENT = "stream_error"
    EMPTY_STREAM = "empty_stream"


class AttemptFailed(Exception):
    """An attempt that may be retried or fallen back from (nothing reached the client yet)."""

    outcome: str = "failed"  # a bounded metric label

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class UpstreamTimeout(AttemptFailed):
    outcome = Outcome.TIMEOUT


class UpstreamConnectError(AttemptFailed):
    outcome = Outcome.CONNECT_ERROR


class UpstreamStatus(AttemptFailed):
    def __init__(self, status: int, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.outcome = f"status_{status}"


class UpstreamThrottled(UpstreamStatus):
    """429: the upstream is rate-limiting (its circuit opens "throttled", the client may get a 429)."""


class UpstreamBadAnswer(AttemptFailed):
    def __init__(self, kind: BadAnswer, message: str) -> None:
        super().__init__(message)
        self.outcome = kind


class UpstreamLimited(Exception):
    """This target's own gateway-wide limit is reached; try the next one."""

    def __init__(self, label: str, limit: float, retry_after: float, never: bool = False) -> None:
        super().__init__(label)
        self.label, self.limit, self.retry_after, self.never = label, limit, retry_after, never


def upstream_status(status: int, message: str, retry_after: float | None) -> UpstreamStatus:
    cls = UpstreamThrottled if status == 429 else UpstreamStatus
    return cls(status, message, retry_after=retry_after)


class PassThroughError(GatewayError):
    """An upstream's own 4xx answer (already normalised to OpenAI's shape), relayed to the client."""

    def __init__(self, body: bytes, *, status: int) -> None:
        message, code = "upstream rejected the request", None
        try:
            err = orjson.loads(body)["error"]
            message, code = str(err["message"]), err.get("code")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
        self.context_length = status in (400, 413, 422) and _says_context_length(message, code)
        if self.context_length:  # one code for it, whichever upstream's words said it
            code = CONTEXT_LENGTH_EXCEEDED
            body = error_body(message, "invalid_request_error", code, "messages")
        super().__init__(message, status=status, code=None if code is None else str(code))
        self._body = body

    def body(self) -> bytes:
        return self._body


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
# How upstreams word a prompt that does not fit: OpenAI's code, DeepSeek's and OpenRouter's messages
# ("maximum context length is N tokens"), Anthropic's ("prompt is too long").
_CONTEXT_PHRASES = (
    "context_length_exceeded",
    "maximum context length",
    "context length",
    "prompt is too long",
)


def _says_context_length(message: str, code: object) -> bool:
    text = f"{code} {message}".lower()
    return any(p in text for p in _CONTEXT_PHRASES)


def native_type(status: int, code: str | None) -> str:
    """The platform's ``LLMErrorType`` for a status and code (the table in this module's docstring)."""
    if code == CONTEXT_LENGTH_EXCEEDED:
        return "CONTEXT_LENGTH"
    if status == 404:
        return "MODEL_NOT_FOUND"
    if status == 429:
        return "RATE_LIMIT"
    if status in (502, 503):
        return "PROVIDER_ERROR"
    if status == 504:
        return "TIMEOUT"
    if 400 <= status < 500:
        return "INVALID_REQUEST"
    return "UNKNOWN"


def native_body(status: int, message: str, code: str | None, request_id: str, provider: str | None) -> bytes:
    """The native API's error: ``{"error": {type, code, message, provider, requestId}}``."""
    message, code = REDACTOR.clean([message, code])
    return orjson.dumps(
        {
            "error": {
                "type": native_type(status, code),
                "code": code,
                "message": message,
                "provider": provider,
                "requestId": request_id,
            }
        }
    )


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    # SECURITY: upstream text can end up in a message (an upstream 4xx echoing the credentials it
    # got): mask every configured secret and key-shaped token, as the log redactor does.
    message, code, param = REDACTOR.clean([message, code, param])
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def sse_error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    """An error delivered inside an already-started SSE stream (no ``[DONE]`` follows it)."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"


def normalize_upstream_error(status: int, body: bytes) -> bytes:
    """Return the upstream's error body if it already has OpenAI's shape, else wrap it in it.

    Only the documented fields are kept, so whatever else an upstream echoes back (request
    headers, internal traces) never reaches the client.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        code = err.get("code")
        return error_body(
            REDACTOR.clean(err["message"])[:2000],
            str(err.get("type") or _type_for(status)),
            None if code is None else str(code),
            err.get("param") if isinstance(err.get("param"), str) else None,
        )
    if isinstance(err, str):
        return error_body(REDACTOR.clean(err)[:2000], _type_for(status))
    return error_body(f"upstream returned HTTP {status}", _type_for(status))


def _type_for(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "upstream_error")
