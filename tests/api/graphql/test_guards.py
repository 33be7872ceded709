"""The GraphQL depth, alias, introspection and size guards, run through a real strawberry schema."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

import pytest
import strawberry
from graphql import GraphQLError, parse, validate
from strawberry.extensions import AddValidationRules
from strawberry.types import ExecutionResult

from gateway.api.graphql.guards import check_size, validation_rules


@strawberry.type
class Node:
    name: str

    @strawberry.field
    def child(self) -> Node:
        return Node(name=f"{self.name}+")


@strawberry.type
class Query:
    @strawberry.field
    def node(self) -> Node:
        return Node(name="root")


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def ticks(self) -> AsyncGenerator[Node, None]:
        yield Node(name="tick")


def make_schema(
    *, max_depth: int = 50, max_aliases: int = 50, introspection: bool = True
) -> strawberry.Schema:
    rules = validation_rules(max_depth=max_depth, max_aliases=max_aliases, introspection=introspection)
    # A factory, not an instance: strawberry wants a fresh extension per request.
    return strawberry.Schema(
        query=Query, subscription=Subscription, extensions=[lambda: AddValidationRules(rules)]
    )


def chain(depth: int, root: str = "node") -> str:
    """``node { child { ... { name } } }``: exactly ``depth`` selection sets deep inside ``{ }``."""
    fields = [root, *["child"] * (depth - 2)]
    return " { ".join(fields) + " { name" + " }" * (depth - 1)


async def errors_of(schema: strawberry.Schema, query: str) -> list[GraphQLError]:
    result = await schema.execute(query)
    return result.errors or []


def assert_refused(errors: list[GraphQLError], message: str) -> None:
    assert [error.message for error in errors] == [message]
    assert errors[0].extensions == {"code": "INVALID_REQUEST"}


# --- depth ---------------------------------------------------------------------------------------


async def test_query_exactly_at_the_depth_limit_runs() -> None:
    result = await make_schema(max_depth=5).execute("{ " + chain(5) + " }")
    assert result.errors is None
    assert result.data == {"node": {"child": {"child": {"child": {"name": "root+++"}}}}}


async def test_query_one_level_deeper_is_refused() -> None:
    result = await make_schema(max_depth=5).execute("{ " + chain(6) + " }")
    assert result.data is None
    assert_refused(result.errors or [], "query depth 6 exceeds the limit of 5")


async def test_depth_hidden_in_nested_fragments_is_refused() -> None:
    # node > child > child > child > child > name: 6 deep, spread over three fragments
    query = """
        { node { ...A } }
        fragment A on Node { child { ...B } }
        fragment B on Node { child { child { ...C } } }
        fragment C on Node { child { name } }
    """
    assert_refused(await errors_of(make_schema(max_depth=5), query), "query depth 6 exceeds the limit of 5")
    assert await errors_of(make_schema(max_depth=6), query) == []


async def test_depth_hidden_in_inline_fragments_is_refused() -> None:
    query = "{ node { ... on Node { child { ... on Node { child { child { child { name } } } } } } } }"
    assert_refused(await errors_of(make_schema(max_depth=5), query), "query depth 6 exceeds the limit of 5")
    assert await errors_of(make_schema(max_depth=6), query) == []


async def first_subscription_result(schema: strawberry.Schema, query: str) -> ExecutionResult:
    stream = await schema.subscribe(query)
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


async def test_deep_subscription_is_refused() -> None:
    result = await first_subscription_result(
        make_schema(max_depth=5), "subscription { " + chain(6, "ticks") + " }"
    )
    assert result.data is None
    assert_refused(result.errors or [], "subscription depth 6 exceeds the limit of 5")


async def test_subscription_at_the_depth_limit_streams() -> None:
    result = await first_subscription_result(
        make_schema(max_depth=5), "subscription { " + chain(5, "ticks") + " }"
    )
    assert result.errors is None
    assert result.data == {"ticks": {"child": {"child": {"child": {"name": "tick+++"}}}}}


DEEP_INTROSPECTION = "{ __schema { types { fields { type { ofType { ofType { ofType { name } } } } } } } }"


async def test_deep_introspection_counts_towards_depth() -> None:
    assert_refused(
        await errors_of(make_schema(max_depth=7), DEEP_INTROSPECTION), "query depth 8 exceeds the limit of 7"
    )
    result = await make_schema(max_depth=8).execute(DEEP_INTROSPECTION)
    assert result.errors is None
    assert result.data is not None and result.data["__schema"]["types"]


def test_every_operation_of_a_document_is_measured() -> None:
    document = parse("query Shallow { node { name } } query Deep { " + chain(4) + " }")
    rules = validation_rules(max_depth=3, max_aliases=50, introspection=True)
    errors = validate(make_schema()._schema, document, rules)
    assert [error.message for error in errors] == ["query depth 4 exceeds the limit of 3"]


# --- aliases -------------------------------------------------------------------------------------


def aliased(count: int) -> str:
    return " ".join(f"a{i}: node {{ name }}" for i in range(count))


async def test_aliases_at_the_limit_run() -> None:
    result = await make_schema(max_aliases=5).execute("{ " + aliased(5) + " }")
    assert result.errors is None
    assert result.data == {f"a{i}": {"name": "root"} for i in range(5)}


async def test_one_alias_over_the_limit_is_refused() -> None:
    errors = await errors_of(make_schema(max_aliases=5), "{ " + aliased(6) + " }")
    assert_refused(errors, "6 aliases exceed the limit of 5")


async def test_aliases_in_a_fragment_count_once_per_spread() -> None:
    fragment = "fragment F on Query { " + aliased(3) + " }"
    schema = make_schema(max_aliases=5)
    assert await errors_of(schema, "{ ...F } " + fragment) == []
    errors = await errors_of(schema, "{ ...F ...F ...F } " + fragment)
    assert_refused(errors, "9 aliases exceed the limit of 5")


async def test_fragment_bomb_is_refused_quickly() -> None:
    # F19 spreads F18 twice, ..., F1 spreads F0 twice: F0's alias executes 2**19 times.
    # Walking every spread, as strawberry's limiters do, takes seconds; this takes milliseconds.
    fragments = ["fragment F0 on Query { x: node { name } }"]
    fragments += [f"fragment F{i} on Query {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, 20)]
    query = "{ ...F19 } " + " ".join(fragments)
    schema = make_schema(max_depth=10, max_aliases=5)

    started = time.perf_counter()
    errors = await errors_of(schema, query)
    elapsed = time.perf_counter() - started

    assert_refused(errors, f"{2**19} aliases exceed the limit of 5")
    assert elapsed < 1.0


def test_alias_count_of_a_huge_bomb_is_capped_in_the_message() -> None:
    fragments = ["fragment F0 on Query { x: node { name } }"]
    fragments += [f"fragment F{i} on Query {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, 40)]
    document = parse("{ ...F39 } " + " ".join(fragments))
    rules = validation_rules(max_depth=10, max_aliases=5, introspection=True)
    errors = validate(make_schema()._schema, document, rules)
    assert [error.message for error in errors] == ["at least 1000000 aliases exceed the limit of 5"]


# --- introspection -------------------------------------------------------------------------------

INTROSPECTION_QUERIES = [
    pytest.param("{ __schema { queryType { name } } }", id="__schema"),
    pytest.param('{ __type(name: "Node") { name } }', id="__type"),
    pytest.param('{ ...I } fragment I on Query { __type(name: "Node") { name } }', id="in-fragment"),
    pytest.param("{ renamed: __schema { queryType { name } } }", id="aliased"),
]


@pytest.mark.parametrize("query", INTROSPECTION_QUERIES)
async def test_introspection_disabled_refuses_schema_and_type(query: str) -> None:
    result = await make_schema(introspection=False).execute(query)
    assert result.data is None
    assert_refused(result.errors or [], "introspection is disabled")


@pytest.mark.parametrize("query", INTROSPECTION_QUERIES)
async def test_introspection_enabled_answers(query: str) -> None:
    result = await make_schema(introspection=True).execute(query)
    assert result.errors is None
    assert result.data


async def test_introspection_disabled_still_allows_typename() -> None:
    result = await make_schema(introspection=False).execute("{ __typename node { __typename name } }")
    assert result.errors is None
    assert result.data == {"__typename": "Query", "node": {"__typename": "Node", "name": "root"}}


# --- size ----------------------------------------------------------------------------------------


def test_size_at_the_limit_is_accepted() -> None:
    check_size("{ node { name } }", 17)


def test_size_over_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="18 bytes, over the limit of 17 bytes"):
        check_size("{ node { name }  }", 17)


def test_size_counts_utf8_bytes_not_characters() -> None:
    query = '{ __type(name: "é") { name } }'  # 30 characters, 31 bytes
    assert len(query) == 30
    check_size(query, 31)
    with pytest.raises(ValueError, match="31 bytes, over the limit of 30 bytes"):
        check_size(query, 30)
