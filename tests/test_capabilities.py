"""Capabilities: shipped defaults, config precedence, and automatic selection (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import config_parser
from gateway.capabilities import Catalog, shipped
from gateway.config import ConfigError
from gateway.errors import InvalidRequest
from gateway.providers import create
from gateway.routing import Router

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}


def catalog(models: list[dict[str, Any]]) -> tuple[Catalog, Router]:
    config = config_parser.parse(
        {
            "providers": [{"name": "p", "type": "openai", "base_url": "http://127.0.0.1:9/v1"}],
            "models": models,
            "plugins": [],
        },
        env={},
    )
    router = Router(config, {p.name: create(p) for p in config.providers})
    return Catalog(config, router.routes), router


def test_shipped_file_covers_the_models_the_issue_names() -> None:
    known = shipped()
    for model in ("deepseek-chat", "deepseek-reasoner", "anthropic/claude-sonnet-4", "gpt-4o", "gpt-4o-mini"):
        info = known[model]
        assert info.context_window and info.max_output_tokens and info.pricing
        assert info.pricing.output_per_mtok > 0 and info.strengths and info.use_cases


def test_first_known_target_fills_what_config_leaves_out() -> None:
    cat, router = catalog(
        [
            {
                "name": "chat",
                "targets": [{"provider": "p", "model": "unknown-x"}, {"provider": "p", "model": "gpt-4o"}],
                "capabilities": {"strengths": ["mine"]},
            }
        ]
    )
    caps = cat.get("chat")
    assert caps.context_window == 128000 and caps.pricing.output_per_mtok == 10.0  # from gpt-4o
    assert caps.strengths == ("mine",) and caps.multimodal is True
    # What accounting and the window check read:
    model = router.routes["chat"].model
    assert (
        model.context_window == 128000 and model.pricing is not None and model.pricing.input_per_mtok == 2.5
    )


def test_config_pricing_block_wins_whole_and_unknown_models_cost_nothing() -> None:
    cat, _ = catalog(
        [
            {
                "name": "a",
                "targets": [{"provider": "p", "model": "gpt-4o"}],
                "pricing": {"output_per_mtok": 1},
            },
            {"name": "b", "targets": [{"provider": "p", "model": "private-model"}]},
        ]
    )
    assert cat.get("a").pricing.input_per_mtok == 0 and cat.get("a").pricing.output_per_mtok == 1
    b = cat.get("b")
    assert (
        b.context_window is None and b.pricing.output_per_mtok == 0 and b.strengths == () and not b.multimodal
    )


def test_selection_breaks_ties_by_input_price_then_name() -> None:
    cat, _ = catalog(
        [
            {"name": n, "targets": [{"provider": "p", "model": n}], "pricing": p}
            for n, p in (
                ("z", {"input_per_mtok": 1, "output_per_mtok": 1}),
                ("y", {"input_per_mtok": 0.5, "output_per_mtok": 1}),
                ("x", {"input_per_mtok": 0.5, "output_per_mtok": 1}),
            )
        ]
    )
    assert cat.select({}, ["z", "y", "x"], CHAT) == "x"
    assert cat.select({}, ["z"], CHAT) == "z"
    with pytest.raises(InvalidRequest) as caught:
        cat.select({}, [], CHAT)
    assert caught.value.code == "no_model_available"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"context_window_fallback": "nope"}, "unknown model 'nope'"),
        ({"context_window_fallback": "a"}, "loops back to 'a'"),
        ({"capabilities": {"max_output_tokens": 0}}, "must be at least 1"),
        ({"capabilities": {"strengths": "coding"}}, "must be a list of strings"),
        ({"capabilities": {"colour": "red"}}, "unknown key"),
        ({"context_window": 0}, "must be at least 1"),
    ],
)
def test_check_config_refuses_bad_capabilities(extra: dict[str, Any], problem: str) -> None:
    models = [{"name": "a", "targets": [{"provider": "p", "model": "m"}], **extra}]
    with pytest.raises(ConfigError) as caught:
        catalog(models)
    assert any(problem in p for p in caught.value.problems), caught.value.problems
