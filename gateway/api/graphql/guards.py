"""Limits on what a GraphQL document may ask for, checked before anything runs.

``validation_rules()`` builds graphql-core validation rules for the view to hand to strawberry
through ``strawberry.extensions.AddValidationRules``; ``check_size()`` refuses an oversized query
before it is even parsed.

Why not strawberry's ``QueryDepthLimiter`` and ``MaxAliasesLimiter``:

1. ``QueryDepthLimiter`` never counts introspection fields: any field whose name starts with ``__``
   ends the walk with depth 0, so ``{ __schema { types { fields { type { ofType ... } } } } }``
   can nest as deep as the client likes.
2. Both walk a named fragment again at every place it is spread, without memoisation. A document
   whose fragments each spread the previous one twice makes them walk 2**n fragments: 20 such
   fragments, a few hundred bytes of query, keep a worker busy for seconds during validation.

The rules here count every operation (query, mutation and subscription) and every field, follow
named and inline fragments as they would execute, and measure each named fragment once. Depth is
the nesting of selection sets: ``{ a }`` is 1 deep, ``{ a { b } }`` is 2 (one more than
``QueryDepthLimiter`` would say for the same document).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from graphql import (
    SKIP,
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    Node,
    OperationDefinitionNode,
    SelectionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    VisitorAction,
)

__all__ = ["check_size", "validation_rules"]

_INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})
# Alias counts stop growing here, so a fragment bomb yields a short message rather than a 2**n number.
_ALIAS_COUNT_CEILING = 1_000_000


def validation_rules(
    *, max_depth: int, max_aliases: int, introspection: bool
) -> list[type[ASTValidationRule]]:
    """The rules enforcing these limits, for ``AddValidationRules``; ``introspection=False``
    refuses ``__schema`` and ``__type`` (``__typename`` stays allowed)."""
    rules: list[type[ASTValidationRule]] = [_depth_limit(max_depth), _alias_limit(max_aliases)]
    if not introspection:
        rules.append(_NoIntrospection)
    return rules


def check_size(query: str, max_bytes: int) -> None:
    """Raise ``ValueError`` if the query is longer than ``max_bytes`` once encoded as UTF-8."""
    size = len(query.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ValueError(f"the query is {size} bytes, over the limit of {max_bytes} bytes")


def _invalid_request(message: str, node: Node | None = None) -> GraphQLError:
    return GraphQLError(message, node, extensions={"code": "INVALID_REQUEST"})


class _Measure:
    """A number folded over a selection set as it would execute, fragments included.

    ``field(node, inner)`` gives a field's value from the value of its own selection set;
    ``combine`` folds the values of sibling selections. A named fragment is measured once and that
    value reused at every spread. A fragment that is unknown, or reached again while it is being
    measured (a cycle), counts as empty: graphql-core's own rules report both.
    """

    def __init__(
        self,
        context: ValidationContext,
        *,
        field: Callable[[FieldNode, int], int],
        combine: Callable[[Iterable[int]], int],
    ) -> None:
        self._context = context
        self._field = field
        self._combine = combine
        self._fragments: dict[str, int] = {}
        self._entered: set[str] = set()

    def of(self, selection_set: SelectionSetNode | None) -> int:
        selections = selection_set.selections if selection_set else ()
        return self._combine(self._selection(selection) for selection in selections)

    def _selection(self, selection: SelectionNode) -> int:
        if isinstance(selection, FieldNode):
            return self._field(selection, self.of(selection.selection_set))
        if isinstance(selection, InlineFragmentNode):
            return self.of(selection.selection_set)
        assert isinstance(selection, FragmentSpreadNode)
        return self._fragment(selection.name.value)

    def _fragment(self, name: str) -> int:
        if name in self._fragments:
            return self._fragments[name]
        fragment = self._context.get_fragment(name)
        if fragment is None or name in self._entered:
            return self._combine(())
        self._entered.add(name)
        value = self._fragments[name] = self.of(fragment.selection_set)
        return value


class _DepthLimit(ValidationRule):
    """Refuses any operation whose selection sets nest deeper than ``max_depth``."""

    max_depth: ClassVar[int]

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)
        self._depth = _Measure(context, field=lambda _field, inner: inner + 1, combine=_deepest)

    def enter_operation_definition(self, node: OperationDefinitionNode, *_args: Any) -> VisitorAction:
        depth = self._depth.of(node.selection_set)
        if depth > self.max_depth:
            message = f"{node.operation.value} depth {depth} exceeds the limit of {self.max_depth}"
            self.report_error(_invalid_request(message, node))
        return SKIP


def _deepest(values: Iterable[int]) -> int:
    return max(values, default=0)


class _AliasLimit(ValidationRule):
    """Refuses a document with more than ``max_aliases`` aliased fields as executed: an alias
    inside a fragment counts once per spread."""

    max_aliases: ClassVar[int]

    def enter_document(self, node: DocumentNode, *_args: Any) -> VisitorAction:
        ceiling = max(self.max_aliases + 1, _ALIAS_COUNT_CEILING)

        def field(field: FieldNode, inner: int) -> int:
            return min(inner + (field.alias is not None), ceiling)

        def combine(values: Iterable[int]) -> int:
            return min(sum(values), ceiling)

        aliases = _Measure(self.context, field=field, combine=combine)
        operations = [d for d in node.definitions if isinstance(d, OperationDefinitionNode)]
        total = combine(aliases.of(operation.selection_set) for operation in operations)
        if total > self.max_aliases:
            count = f"at least {ceiling}" if total == ceiling else str(total)
            self.report_error(_invalid_request(f"{count} aliases exceed the limit of {self.max_aliases}"))
        return SKIP


class _NoIntrospection(ValidationRule):
    """Refuses ``__schema`` and ``__type`` anywhere in the document, fragments included."""

    def enter_field(self, node: FieldNode, *_args: Any) -> None:
        if node.name.value in _INTROSPECTION_FIELDS:
            self.report_error(_invalid_request("introspection is disabled", node))


def _depth_limit(limit: int) -> type[ValidationRule]:
    class DepthLimit(_DepthLimit):
        max_depth = limit

    return DepthLimit


def _alias_limit(limit: int) -> type[ValidationRule]:
    class AliasLimit(_AliasLimit):
        max_aliases = limit

    return AliasLimit
