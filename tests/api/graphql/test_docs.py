"""docs/graphql.md stays current: its SDL is the running schema's, and every operation has examples."""

from __future__ import annotations

import re
from pathlib import Path

import graphql
import pytest

from gateway.api.graphql.schema import build_schema

DOC = Path(__file__).resolve().parents[3] / "docs" / "graphql.md"
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
# The clients every operation is shown with: curl (HTTP POST, not for subscriptions), the graphql-ws
# JavaScript client and a Python client.
LANGUAGES = {"query": {"bash", "js", "python"}, "mutation": {"bash", "js", "python"}}
LANGUAGES["subscription"] = {"js", "python"}


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _normalised(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _schema_block(doc: str) -> str:
    """The body of the first ```graphql block under the "## Schema" heading."""
    heading = re.search(r"^## Schema[ \t]*$", doc, re.M)
    assert heading, 'docs/graphql.md has no "## Schema" heading'
    section = doc[heading.end() :]
    following = re.search(r"^## ", section, re.M)
    section = section[: following.start()] if following else section
    lines = section.splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "```graphql"), None)
    assert start is not None, "no ```graphql block under ## Schema"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].rstrip() == "```"), None)
    assert end is not None, "the ```graphql block under ## Schema is not closed"
    return "\n".join(lines[start + 1 : end])


def _examples(doc: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block except the schema's SDL."""
    sdl = _normalised(_schema_block(doc))
    return [(lang, body) for lang, body in FENCE.findall(doc) if _normalised(body) != sdl]


def _root_fields() -> list[tuple[str, str]]:
    """(operation keyword, field name) for every Query, Mutation and Subscription field."""
    schema = graphql.build_schema(str(build_schema([])))
    roots = {
        "query": schema.query_type,
        "mutation": schema.mutation_type,
        "subscription": schema.subscription_type,
    }
    return [(kind, name) for kind, root in roots.items() if root is not None for name in root.fields]


def _shows(body: str, kind: str, field: str) -> bool:
    """Whether a block runs ``field`` in an operation of this kind: the keyword, and the field as a
    GraphQL selection (not a JSON string such as "complete", nor an attribute such as .complete)."""
    selection = re.compile(rf"(?<![\w\"'$.]){re.escape(field)}(?=[\s({{}}])")
    return re.search(rf"\b{kind}\b", body) is not None and selection.search(body) is not None


def test_the_documented_schema_is_the_running_schema() -> None:
    documented = _normalised(_schema_block(_doc()))
    running = _normalised(str(build_schema([])))
    assert documented == running, (
        "docs/graphql.md's SDL is out of date: regenerate it with\n"
        '  .venv/bin/python -c "from gateway.api.graphql.schema import build_schema; '
        'print(build_schema([]))"'
    )


@pytest.mark.parametrize(("kind", "field"), _root_fields())
def test_every_operation_has_examples(kind: str, field: str) -> None:
    languages = {lang for lang, body in _examples(_doc()) if _shows(body, kind, field)}
    assert languages, f"docs/graphql.md has no example of the {kind} field {field!r}"
    missing = LANGUAGES[kind] - languages
    assert not missing, f"docs/graphql.md shows the {kind} field {field!r} in no {sorted(missing)} example"
