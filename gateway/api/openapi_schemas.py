"""The JSON Schemas of ``/openapi.json`` (``components.schemas``), written with a few small helpers.

Request schemas say what the gateway accepts (permissive where OpenAI is, closed where the native API
rejects unknown keys); response schemas say what a client can rely on and stay open to new fields.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
COUNT: Schema = {"type": "integer", "minimum": 0}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def null(type_: str, **keywords: Any) -> Schema:
    """A value of ``type_`` or ``null``."""
    return {"type": [type_, "null"], **keywords}


def maybe(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: Schema, **keywords: Any) -> Schema:
    return {"type": "array", "items": items, **keywords}


def obj(
    properties: dict[str, Schema],
    required: tuple[str, ...] | str = (),
    *,
    closed: bool = False,
    **keywords: Any,
) -> Schema:
    """An object; ``required="*"`` requires every property, ``closed`` rejects unknown keys."""
    schema: Schema = {"type": "object", "properties": properties}
    names = list(properties) if required == "*" else list(required)
    if names:
        schema["required"] = names
    if closed:
        schema["additionalProperties"] = False
    return {**schema, **keywords}


def sse_event(data: Schema, *, error: Schema | None = None, done_marker: bool = False) -> Schema:
    """One Server-Sent Event whose ``data`` is JSON described by ``data`` (``event: error`` events by
    ``error``; with ``done_marker`` the literal ``data: [DONE]`` that ends an OpenAI stream)."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    event: Schema = obj(
        {"event": STRING, "data": STRING, "id": STRING, "retry": INTEGER},
        ("data",),
        description="One event of the stream: `event` (absent: `message`), `data` (JSON).",
    )
    if error is not None:
        error_data = {**json_data, "contentSchema": error}
        event["if"] = obj({"event": {"const": "error"}}, ("event",))
        event["then"] = {"properties": {"data": error_data}}
        event["else"] = {"properties": {"data": json_data}}
    elif done_marker:
        event["if"] = {"properties": {"data": {"const": "[DONE]"}}}
        event["else"] = {"properties": {"data": json_data}}
    else:
        event["properties"]["data"] = json_data
    return event


LIMITS = obj(
    {name: null("integer", minimum=1) for name in ("rpm", "tpm", "max_parallel")},
    closed=True,
    description="Requests per minute, tokens per minute, concurrent requests. Absent: no limit.",
)
BUDGETS = obj(
    {
        "daily_usd": null("number", minimum=0),
        "monthly_usd": null("number", minimum=0),
        "daily_tokens": null("integer", minimum=0),
        "monthly_tokens": null("integer", minimum=0),
    },
    closed=True,
    description="Spend caps per UTC day and month (USD and tokens). Absent: no cap.",
)
TEAM_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}
MODEL_NAMES = null("array", items=STRING, description="Allowed model names; null or absent: every model.")
TEAM_FIELDS: dict[str, Schema] = {
    "models": MODEL_NAMES,
    "limits": maybe(ref("Limits")),
    "budgets": maybe(ref("Budgets")),
    "model_limits": maybe(obj({}, additionalProperties=ref("Limits"), description="Limits per model.")),
    "guardrails": null(
        "array", items=STRING, description="Names of guardrails.rules for this team; null: every rule."
    ),
}

OPENAI: dict[str, Schema] = {
    "OpenAIError": obj(
        {
            "error": obj(
                {
                    "message": STRING,
                    "type": {"type": "string", "examples": ["invalid_request_error", "rate_limit_error"]},
                    "param": null("string"),
                    "code": null("string", examples=["model_not_found", "rate_limit_exceeded"]),
                },
                "*",
            )
        },
        "*",
        description="OpenAI's error shape, used by every route outside the native API.",
    ),
    "ChatMessage": obj(
        {
            "role": {"type": "string", "examples": ["system", "user", "assistant", "tool", "developer"]},
            "content": {"type": ["string", "array", "null"], "description": "Text, or content parts."},
            "name": STRING,
        },
        ("role",),
    ),
    "ChatCompletionRequest": obj(
        {
            "model": {"type": "string", "minLength": 1, "description": "A model name of GET /v1/models."},
            "messages": array(ref("ChatMessage"), minItems=1),
            "stream": {"type": "boolean", "default": False},
            "stream_options": obj({"include_usage": BOOLEAN}),
            "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "stop": {"anyOf": [STRING, array(STRING, maxItems=4), {"type": "null"}]},
            "n": {"type": "integer", "minimum": 1},
            "seed": INTEGER,
            "user": STRING,
            "tools": array({"type": "object"}),
            "tool_choice": {"type": ["string", "object"]},
            "response_format": {"type": "object"},
        },
        ("model", "messages"),
        description="OpenAI's chat request. Other OpenAI fields are accepted and sent upstream as they are.",
        additionalProperties=True,
    ),
    "ChatCompletion": obj(
        {
            "id": STRING,
            "object": {"type": "string", "examples": ["chat.completion"]},
            "created": INTEGER,
            "model": {"type": "string", "description": "The upstream model that answered."},
            "choices": array(
                obj(
                    {
                        "index": INTEGER,
                        "message": obj({"role": STRING, "content": null("string")}),
                        "finish_reason": null("string"),
                    }
                )
            ),
            "usage": maybe(ref("OpenAIUsage")),
        },
        ("object", "choices"),
        description="The upstream's answer, relayed byte for byte.",
    ),
    "ChatCompletionChunk": obj(
        {
            "id": STRING,
            "object": {"type": "string", "examples": ["chat.completion.chunk"]},
            "created": INTEGER,
            "model": STRING,
            "choices": array(
                obj({"index": INTEGER, "delta": {"type": "object"}, "finish_reason": null("string")})
            ),
            "usage": maybe(ref("OpenAIUsage")),
        },
        ("choices",),
    ),
    "OpenAIUsage": obj({"prompt_tokens": COUNT, "completion_tokens": COUNT, "total_tokens": COUNT}),
    "EmbeddingRequest": obj(
        {
            "model": {"type": "string", "minLength": 1},
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    array({"anyOf": [STRING, INTEGER, array(INTEGER)]}, minItems=1),
                ]
            },
            "encoding_format": {"enum": ["float", "base64"]},
            "dimensions": {"type": "integer", "minimum": 1},
            "user": STRING,
        },
        ("model", "input"),
        additionalProperties=True,
    ),
    "EmbeddingResponse": obj(
        {
            "object": STRING,
            "data": array(
                obj({"object": STRING, "index": INTEGER, "embedding": {"type": ["array", "string"]}})
            ),
            "model": null("string"),
            "usage": obj({"prompt_tokens": COUNT, "total_tokens": COUNT}),
        },
        ("data",),
    ),
    "ModelList": obj(
        {
            "object": {"const": "list"},
            "data": array(
                obj({"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING}, "*")
            ),
        },
        "*",
    ),
}

NATIVE_USAGE = obj({"promptTokens": COUNT, "completionTokens": COUNT, "totalTokens": COUNT}, "*")
NATIVE: dict[str, Schema] = {
    "LLMErrorType": {
        "enum": [
            "PROVIDER_ERROR",
            "RATE_LIMIT",
            "CONTEXT_LENGTH",
            "INVALID_REQUEST",
            "MODEL_NOT_FOUND",
            "TIMEOUT",
            "UNKNOWN",
            "CONTENT_FILTER",
        ]
    },
    "NativeError": obj(
        {
            "error": obj(
                {
                    "type": ref("LLMErrorType"),
                    "code": null("string", examples=["context_length_exceeded", "invalid_stream_ticket"]),
                    "message": STRING,
                    "provider": null("string"),
                    "requestId": STRING,
                },
                "*",
            )
        },
        "*",
        description="The native API's error shape.",
    ),
    "NativeMessage": obj(
        {
            "role": {"type": "string", "examples": ["system", "user", "assistant"]},
            "content": {
                "type": ["string", "array"],
                "description": "Text, or OpenAI-style content parts (`text`, `image_url`).",
            },
        },
        ("role", "content"),
    ),
    "LLMRequirements": obj(
        {
            "minContextWindow": {"type": "integer", "minimum": 1},
            "multimodal": BOOLEAN,
            "strengths": array(STRING),
            "useCases": array(STRING),
            "maxInputPrice": {"type": "number", "minimum": 0, "description": "USD per million tokens."},
            "maxOutputPrice": {"type": "number", "minimum": 0, "description": "USD per million tokens."},
        },
        closed=True,
        description="With model absent or `auto`: the cheapest allowed model that meets all of these.",
    ),
    "LLMOptions": obj(
        {
            # null means "not given", as TypeScript clients often send it.
            "model": {"type": ["string", "null"], "minLength": 1, "examples": ["chat", "auto"]},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "maxTokens": {"type": ["integer", "null"], "minimum": 1},
            "topP": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "stop": {"anyOf": [STRING, array(STRING, maxItems=4), {"type": "null"}]},
            "requirements": ref("LLMRequirements"),
        },
        closed=True,
    ),
    "LLMRequest": obj(
        {"messages": array(ref("NativeMessage"), minItems=1), "options": ref("LLMOptions")},
        ("messages",),
        closed=True,
    ),
    "NativeUsage": NATIVE_USAGE,
    "ModelCapabilities": obj(
        {
            "contextWindow": null("integer"),
            "maxOutputTokens": null("integer"),
            "pricing": obj(
                {"input": NUMBER, "output": NUMBER, "images": null("number")},
                "*",
                description="USD per million tokens.",
            ),
            "strengths": array(STRING),
            "useCases": array(STRING),
            "multimodal": BOOLEAN,
        },
        "*",
    ),
    "LLMResponse": obj(
        {
            "id": STRING,
            "content": STRING,
            "model": {"type": "string", "description": "The gateway's model name."},
            "provider": STRING,
            "upstreamModel": STRING,
            "finishReason": null("string"),
            "usage": ref("NativeUsage"),
            "costUsd": null("number"),
            "cached": BOOLEAN,
            "latencyMs": NUMBER,
            "capabilities": ref("ModelCapabilities"),
        },
        "*",
    ),
    "NativeStreamDelta": obj({"content": STRING, "done": {"const": False}}, "*"),
    "NativeStreamDone": obj(
        {
            "content": {"const": ""},
            "done": {"const": True},
            "finishReason": null("string"),
            "usage": ref("NativeUsage"),
            "costUsd": null("number"),
            "model": STRING,
            "provider": STRING,
        },
        "*",
    ),
    "StreamTicket": obj(
        {
            "ticket": STRING,
            "url": {"type": "string", "description": "The stream's URL with the ticket, for EventSource."},
            "expiresIn": {"type": "integer", "minimum": 1, "description": "Seconds (30)."},
        },
        "*",
    ),
    "ProviderList": obj(
        {
            "providers": array(
                obj(
                    {
                        "name": STRING,
                        "type": STRING,
                        "status": {"enum": ["up", "down", "unknown"]},
                        "models": array(STRING),
                    },
                    "*",
                )
            )
        },
        "*",
    ),
    "ProviderModels": obj(
        {
            "provider": STRING,
            "models": array(obj({"name": STRING, "capabilities": ref("ModelCapabilities")}, "*")),
        },
        "*",
    ),
    "NativeModelList": obj(
        {
            "models": array(
                obj(
                    {
                        "name": STRING,
                        "providers": array(STRING),
                        "capabilities": ref("ModelCapabilities"),
                        "performance": obj(
                            {
                                "p50LatencyMs": null("number"),
                                "p50TtftMs": null("number"),
                                "outputTokensPerSecond": null("number"),
                                "errorRate": null("number"),
                                "sampleSize": COUNT,
                            },
                            "*",
                        ),
                    },
                    "*",
                )
            )
        },
        "*",
    ),
}

USAGE_ROW = {"requests": COUNT, "prompt_tokens": COUNT, "completion_tokens": COUNT, "cost_usd": NUMBER}
OPERATIONS: dict[str, Schema] = {
    "Limits": LIMITS,
    "Budgets": BUDGETS,
    "TeamInput": obj({"id": TEAM_ID, **TEAM_FIELDS}, ("id",), closed=True),
    "TeamPatch": obj(
        {"id": TEAM_ID, **TEAM_FIELDS},
        closed=True,
        description="JSON Merge Patch (RFC 7396): nested objects merge, null removes a field.",
    ),
    "Team": obj(
        {
            "id": STRING,
            "models": MODEL_NAMES,
            "limits": ref("Limits"),
            "budgets": ref("Budgets"),
            "model_limits": obj({}, additionalProperties=ref("Limits")),
            "guardrails": null("array", items=STRING),
            "source": {"enum": ["config", "api"], "description": "config teams are read-only here."},
        },
        "*",
    ),
    "TeamList": obj({"object": {"const": "list"}, "data": array(ref("Team"))}, "*"),
    "KeyInput": obj(
        {
            "team": {"type": "string", "minLength": 1},
            "name": null("string", maxLength=200),
            "expires_at": null("string", format="date-time"),
            "models": MODEL_NAMES,
            "limits": maybe(ref("Limits")),
            "budgets": maybe(ref("Budgets")),
        },
        ("team",),
        closed=True,
    ),
    "Key": obj(
        {
            "id": STRING,
            "team": STRING,
            "name": null("string"),
            "prefix": {"type": "string", "description": "The key's first characters, to recognise it."},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": null("string", format="date-time"),
            "models": MODEL_NAMES,
            "disabled": BOOLEAN,
            "limits": ref("Limits"),
            "budgets": ref("Budgets"),
        },
        "*",
    ),
    "CreatedKey": {
        "allOf": [
            ref("Key"),
            obj({"key": {"type": "string", "description": "The key itself: shown this once only."}}, "*"),
        ]
    },
    "KeyList": obj({"object": {"const": "list"}, "data": array(ref("Key"))}, "*"),
    "Usage": obj(
        {
            "object": {"const": "usage"},
            "team": STRING,
            "start": {"type": "string", "format": "date"},
            "end": {"type": "string", "format": "date"},
            "data": array(
                obj({"date": {"type": "string", "format": "date"}, "model": STRING, **USAGE_ROW}, "*")
            ),
            "total": obj(USAGE_ROW, "*"),
        },
        "*",
    ),
    "Status": obj({"status": {"enum": ["ok", "error"]}, "reason": STRING}, ("status",)),
    "DetailedHealth": obj(
        {
            "status": {"enum": ["ok", "error"]},
            "info": obj(
                {
                    "redis": obj(
                        {
                            "status": {"enum": ["up", "down", "not_configured"]},
                            "details": obj(
                                {
                                    "connection": BOOLEAN,
                                    "latency": null("number", description="Milliseconds."),
                                    "backend": {"enum": ["redis", "memory"]},
                                },
                                "*",
                            ),
                        },
                        "*",
                    ),
                    "providers": obj(
                        {
                            "status": {"enum": ["up", "down"]},
                            "details": obj(
                                {},
                                additionalProperties=obj(
                                    {
                                        "status": {"enum": ["up", "down", "unknown"]},
                                        "latency": null("number"),
                                    },
                                    "*",
                                ),
                            ),
                        },
                        "*",
                    ),
                },
                "*",
            ),
        },
        "*",
    ),
}

STREAMS: dict[str, Schema] = {
    "ChatCompletionStreamEvent": sse_event(
        {"anyOf": [ref("ChatCompletionChunk"), ref("OpenAIError")]}, done_marker=True
    ),
    "NativeStreamEvent": sse_event(
        {"oneOf": [ref("NativeStreamDelta"), ref("NativeStreamDone")]}, error=ref("NativeError")
    ),
}

ANTHROPIC: dict[str, Schema] = {
    "AnthropicError": obj(
        {
            "type": {"const": "error"},
            "error": obj(
                {
                    "type": {
                        "type": "string",
                        "examples": ["invalid_request_error", "authentication_error", "rate_limit_error"],
                    },
                    "message": STRING,
                },
                "*",
            ),
        },
        "*",
        description="Anthropic's error shape (the type follows the status: docs/errors.md).",
    ),
    "MessagesRequest": obj(
        {
            "model": {"type": "string", "minLength": 1, "description": "A model name of GET /v1/models."},
            "max_tokens": {"type": "integer", "minimum": 1},
            "messages": array(
                obj(
                    {"role": {"enum": ["user", "assistant"]}, "content": {"type": ["string", "array"]}},
                    ("role", "content"),
                ),
                minItems=1,
            ),
            "system": {"type": ["string", "array"]},
            "stream": BOOLEAN,
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "stop_sequences": array(STRING),
            "tools": array({"type": "object"}),
            "tool_choice": {"type": "object"},
            "metadata": {"type": "object"},
        },
        ("model", "max_tokens", "messages"),
        description="Anthropic's Messages request. Other fields (thinking, top_k, ...) go to an Anthropic "
        "target as they are (all but service_tier) and are not sent to an OpenAI-compatible one.",
        additionalProperties=True,
    ),
    "Message": obj(
        {
            "id": STRING,
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "model": STRING,
            "content": array({"type": "object", "required": ["type"]}),
            "stop_reason": null("string"),
            "stop_sequence": null("string"),
            "usage": obj({"input_tokens": COUNT, "output_tokens": COUNT}, "*"),
        },
        ("id", "type", "role", "content", "usage"),
    ),
    "CountTokensRequest": obj(
        {
            "model": {"type": "string", "minLength": 1},
            "messages": array({"type": "object"}),
            "system": {"type": ["string", "array"]},
            "tools": array({"type": "object"}),
        },
        ("model", "messages"),
        additionalProperties=True,
    ),
    "TokenCount": obj({"input_tokens": COUNT}, "*"),
    "MessageStreamEvent": sse_event({"type": "object", "required": ["type"]}, error=ref("AnthropicError")),
}

SCHEMAS: dict[str, Schema] = {**OPENAI, **NATIVE, **OPERATIONS, **STREAMS, **ANTHROPIC}
