"""The context-window estimate: a floor, so a request that fits is never refused."""

from __future__ import annotations

from gateway.accounting import fits_window


def chat(text: str | list[dict[str, str]], **extra: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_words_plus_requested_output_must_fit() -> None:
    text = " ".join(["word"] * 100)
    assert fits_window(chat(text), 100)
    assert not fits_window(chat(text), 99)
    assert fits_window(chat(text, max_tokens=50), 150)
    assert not fits_window(chat(text, max_tokens=51), 150)
    assert not fits_window(chat(text, max_completion_tokens=51), 150)


def test_text_parts_count_and_images_do_not() -> None:
    parts = [{"type": "text", "text": "a b c"}, {"type": "image_url", "image_url": "data:..."}]
    assert fits_window(chat(parts), 3) and not fits_window(chat(parts), 2)  # type: ignore[arg-type]


def test_long_runs_without_spaces_are_never_overestimated() -> None:
    # 10,000 characters that real tokenizers may pack into few tokens: one word, so it always fits.
    assert fits_window(chat("=" * 10_000), 10)
    assert fits_window(chat("日本語のテキスト" * 500), 10)


def test_non_finite_or_negative_upstream_figures_are_no_figures() -> None:
    import pytest

    from gateway import jsonx
    from gateway.context import Usage

    for text in ('{"cost": NaN}', '{"cost": Infinity}', '{"cost": 1e400}'):
        with pytest.raises(ValueError):
            jsonx.loads(text)
    usage = Usage.from_json({"prompt_tokens": 10**15, "completion_tokens": 5, "cost": -1.0})
    assert usage is not None and usage.cost_usd is None and usage.prompt_tokens == 0
    assert jsonx.loads('{"text": "\\ud800"}') == {"text": "\ud800"}  # what orjson refuses but JSON allows
