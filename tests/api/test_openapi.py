"""``/openapi.json`` and ``/docs``: a valid OpenAPI 3.1 document that covers every route, a reference
page that works offline, and a running gateway that answers as the document says (schemathesis)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from yarl import URL

from tests.conftest import MASTER_KEY, TEAM_KEY, RunningGateway, tenancy_config

CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_MODE = 15
# Names the test config knows, so generated requests also reach past "no such model / team / provider".
KNOWN_PATH_PARAMETERS = {"provider": "primary", "team": "team-a"}


async def get(gw: RunningGateway, path: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(gw.root + path) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def document(gw: RunningGateway) -> dict[str, Any]:
    status, headers, raw = await get(gw, "/openapi.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


@pytest.fixture
async def tenant_gw(upstream: Any, make_gateway: Callable[..., Any]) -> RunningGateway:
    """Auth, limits and budgets on (teams, the master key, Redis), in front of the mock upstream."""
    gw: RunningGateway = await make_gateway(tenancy_config(upstream.url))
    return gw


async def test_the_document_is_valid_openapi_3_1(tenant_gw: RunningGateway) -> None:
    doc = await document(tenant_gw)
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema, or an unresolvable $ref


async def test_every_route_is_documented_and_every_documented_operation_exists(
    tenant_gw: RunningGateway,
) -> None:
    doc = await document(tenant_gw)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in tenant_gw.app.router.routes()
        if route.method not in ("HEAD", "OPTIONS") and route.resource is not None
    }
    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch")
    }
    assert sorted(served - documented) == [], "routes missing from /openapi.json"
    assert sorted(documented - served) == [], "documented operations the gateway does not serve"


async def test_docs_page_loads_only_its_own_bundled_assets(tenant_gw: RunningGateway) -> None:
    status, headers, html = await get(tenant_gw, "/docs")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    page = html.decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(r.endswith(".js") for r in refs) and any(r.endswith(".css") for r in refs), refs
    base = URL(tenant_gw.root + "/docs")
    bodies = [page]
    for ref in refs:
        assert not URL(ref).is_absolute() and not ref.startswith("//"), ref
        status, headers, body = await get(tenant_gw, base.join(URL(ref)).path)
        assert status == 200, ref
        bodies.append(body.decode())
        if ref.endswith((".js", ".css")):
            expected = "text/javascript" if ref.endswith(".js") else "text/css"
            assert headers["Content-Type"].startswith(expected), (ref, headers["Content-Type"])
            assert "default-src 'self'" in headers["Content-Security-Policy"]
    for text in bodies:
        assert not re.search(r"(?i)https?://", text), "the page must work offline"
    script = next(b for r, b in zip(refs, bodies[1:], strict=True) if r.endswith(".js"))
    assert '"openapi.json"' in script  # what the page renders: this gateway's own document
    status, _, _ = await get(tenant_gw, "/docs/nothing.js")
    assert status == 404


# --- the running gateway against its own document (schemathesis) ------------------------------------


def _explore(strategy: st.SearchStrategy[Any], max_examples: int, check: Callable[[Any], None]) -> None:
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: a CI failure reproduces locally
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        check(case)

    run()


def _known_model(case: Any) -> Any:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body = {**case.body, "model": "chat"}
    return case


def _describe(exc: BaseException) -> str:
    """schemathesis' report (the failed checks, the response, a curl command to reproduce it)."""
    if isinstance(exc, FailureGroup):
        return exc.message.strip()
    if isinstance(exc, BaseExceptionGroup):  # Hypothesis found several distinct failures
        return "\n".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}".strip()


def _contract_failures(doc: dict[str, Any], base_url: str) -> list[str]:
    """Every documented operation, from its examples and from generated valid and invalid requests:
    no 5xx, and status, content type, headers and body (SSE events included) as documented. Bodies
    the native API promises to reject (unknown keys, out-of-range values) must get a 4xx.

    Nothing is excluded: GET /api/v1/llm/complete/stream gets random tickets here (401, documented;
    the test below walks the real ticket flow), and /metrics, /docs are checked for status and media
    type (their text bodies have no JSON schema). Operations run in the document's order against one
    gateway, so a failure that opens a circuit also shows up in the health operations after it."""
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # The admin API takes the master key; everything else a team key (ignored where none is needed).
        key = MASTER_KEY if operation.path.startswith("/admin/") else TEAM_KEY
        headers = {"Authorization": f"Bearer {key}"}
        checks = list(CONFORMANCE)
        if operation.path.startswith("/api/v1/") and operation.method.upper() == "POST":
            checks.append(negative_data_rejection)

        def check(case: Any, headers: dict[str, str] = headers, checks: list[Any] = checks) -> None:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=15)
            case.validate_response(response, checks=checks, headers=headers)

        runs = [(f"example {i + 1}", s, 1) for i, s in enumerate(operation.get_strategies_from_examples())]
        runs += [
            (mode.value, operation.as_strategy(generation_mode=mode), EXAMPLES_PER_MODE)
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
        ]
        known = {k: v for k, v in KNOWN_PATH_PARAMETERS.items() if f"{{{k}}}" in operation.path}
        if known or operation.path.startswith("/v1/"):
            pinned = operation.as_strategy(path_parameters=known).map(_known_model)
            runs.append(("positive, configured names", pinned, EXAMPLES_PER_MODE))
        for name, strategy, count in runs:
            try:
                _explore(strategy, count, check)
            except Unsatisfiable:
                continue  # e.g. nothing to make invalid in an operation without parameters or body
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is the latter
                failures.append(f"=== {operation.label} [{name}]\n{_describe(exc)}")
    session.close()
    return failures


@pytest.mark.timeout(180)
async def test_the_gateway_answers_as_its_document_says(tenant_gw: RunningGateway) -> None:
    doc = await document(tenant_gw)
    # schemathesis is synchronous (requests): it runs in a thread while this loop serves the gateway.
    failures = await asyncio.to_thread(_contract_failures, doc, tenant_gw.root)
    assert not failures, f"{len(failures)} contract failure(s):\n\n" + "\n\n".join(failures)


async def test_a_stream_ticket_opens_the_documented_event_stream(tenant_gw: RunningGateway) -> None:
    """The browser flow the property test cannot reach with random tickets: POST a ticket, then GET
    the stream with it (no key), and the stream is the documented events; the ticket works once."""
    doc = await document(tenant_gw)
    schema = schemathesis.openapi.from_dict(doc)
    body = {"messages": [{"role": "user", "content": "Say hello."}], "options": {"model": "chat"}}

    def flow() -> list[int]:
        with requests.Session() as session:
            created = session.post(
                tenant_gw.root + "/api/v1/llm/complete/stream/ticket",
                json=body,
                headers={"Authorization": f"Bearer {TEAM_KEY}"},
                timeout=15,
            )
            ticket_op = schema["/api/v1/llm/complete/stream/ticket"]["POST"]
            ticket_op.Case(body=body).validate_response(created, checks=CONFORMANCE)
            assert created.status_code == 201, created.text
            stream_op = schema["/api/v1/llm/complete/stream"]["GET"]
            case = stream_op.Case(query={"ticket": created.json()["ticket"]})
            first = case.call(base_url=tenant_gw.root, session=session, timeout=15)
            case.validate_response(first, checks=CONFORMANCE)
            assert first.headers["content-type"][0].startswith("text/event-stream")
            lines = first.content.decode().splitlines()
            events = [orjson.loads(line[5:]) for line in lines if line.startswith("data:")]
            assert (
                events
                and events[-1]["done"] is True
                and "Say hello." in "".join(e["content"] for e in events)
            )
            again = case.call(base_url=tenant_gw.root, session=session, timeout=15)
            case.validate_response(again, checks=CONFORMANCE)
            assert orjson.loads(again.content)["error"]["code"] == "invalid_stream_ticket"
            return [first.status_code, again.status_code]

    assert await asyncio.to_thread(flow) == [200, 401]
