"""core/prompt.py: ComfyUI prompt syntax: weights, escapes, 75-token chunks, and length matching for CFG."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st
import torch

from flipbook_pack.lightning import pipeline as P
from flipbook_pack.core.prompt import encode_weighted, match_lengths, parse_weights, tokenize_weighted
from flipbook_pack.lightning.text import load_tokenizer

TOKENIZER = load_tokenizer()


@pytest.mark.parametrize("text,expected", [
    ("a (b:1.5) ((c))", [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", pytest.approx(1.21))]),
    (r"literal \(x\) here", [("literal (x) here", 1.0)]),
    ("(unclosed", [("(unclosed", 1.0)]),
    ("a (b (c:0.5) d) e", [("a ", 1.0), ("b ", pytest.approx(1.1)), ("c", 0.5), (" d", pytest.approx(1.1)),
                           (" e", 1.0)]),
    ("(x:notnum)", [("x:notnum", pytest.approx(1.1))]),
    ("ratio 16:9 stray)", [("ratio 16:9 stray)", 1.0)]),
])
def test_parse_weights_follows_comfyui(text, expected):
    assert parse_weights(text) == expected


def test_plain_prompts_tokenize_exactly_like_the_hf_tokenizer():
    text = "a red fox running through fresh snow, masterpiece, best quality!"
    (chunk,) = tokenize_weighted(TOKENIZER, text)
    reference = TOKENIZER(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert [t for t, _ in chunk] == reference and all(w == 1.0 for _, w in chunk)


def test_long_prompts_become_chunks_without_splitting_short_words():
    text = " ".join(["watercolor"] * 60 + ["antidisestablishmentarianism"] * 3)
    chunks = tokenize_weighted(TOKENIZER, text)
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0][0][0] == TOKENIZER.bos_token_id and chunks[1][0][0] == TOKENIZER.bos_token_id
    word = TOKENIZER("antidisestablishmentarianism", add_special_tokens=False).input_ids
    second = [t for t, _ in chunks[1][1:]]
    assert second[: len(word)] == word  # the long word moved whole to the next chunk


def test_weights_scale_away_from_the_empty_prompt(lightning_model):
    m = lightning_model
    plain = encode_weighted(m.tokenizer, m.text_encoder, "a fox in snow", m.device)
    same = encode_weighted(m.tokenizer, m.text_encoder, "a (fox:1.0) in snow", m.device)
    torch.testing.assert_close(plain, same)
    heavy = encode_weighted(m.tokenizer, m.text_encoder, "a (fox:1.5) in snow", m.device)
    empty = encode_weighted(m.tokenizer, m.text_encoder, "", m.device)
    fox = 2  # BOS, "a", "fox"
    torch.testing.assert_close(heavy[0, fox] - empty[0, fox], 1.5 * (plain[0, fox] - empty[0, fox]))
    untouched = [i for i in range(77) if i != fox]
    torch.testing.assert_close(heavy[0, untouched], plain[0, untouched])


def test_repeating_the_context_leaves_cross_attention_unchanged():
    short, long = torch.randn(1, 77, 8), torch.randn(1, 154, 8)
    a, b = match_lengths([short, long])
    assert a.shape == b.shape == (1, 154, 8)
    q = torch.randn(1, 5, 8)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, short, short),
                               torch.nn.functional.scaled_dot_product_attention(q, a, a))


def test_cfg_with_prompts_of_different_lengths(lightning_model):
    long_negative = ", ".join(["blurry, low quality, watermark"] * 12)
    result = P.generate(lightning_model, P.GenerationRequest(prompt="(a fox:1.2)", negative=long_negative, cfg=1.5,
                                                             frames=2, width=64, height=64))
    assert result.denoiser_calls == 4 and torch.isfinite(result.frames).all()


def test_embeddings_are_left_out_with_a_note(lightning_model):
    from flipbook_pack.core.prompt import embedding_names

    assert embedding_names("bad hands, embedding:EasyNegative, (embedding:badhandv4:1.2)") == [
        "EasyNegative", "badhandv4"]
    with_embedding = tokenize_weighted(TOKENIZER, "a fox embedding:EasyNegative")
    assert with_embedding == tokenize_weighted(TOKENIZER, "a fox")
    result = P.generate(lightning_model, P.GenerationRequest(prompt="a fox", negative="embedding:EasyNegative",
                                                             cfg=1.5, frames=2, width=64, height=64))
    assert "EasyNegative" in result.notes[-1] and "not supported" in result.notes[-1]
    quiet = P.generate(lightning_model, P.GenerationRequest(prompt="a fox", negative="embedding:EasyNegative",
                                                            frames=2, width=64, height=64))
    assert quiet.notes == ()  # at cfg 1 the negative is not used, so nothing was left out


def test_contexts_are_padded_only_within_comfyuis_bound():
    from flipbook_pack.core.prompt import join_contexts

    def chunks(n):
        return torch.randn(1, 77 * n, 8)

    assert join_contexts([chunks(2), chunks(1)]).shape == (2, 154, 8)  # repeated twice: cheap
    assert join_contexts([chunks(4), chunks(1)]).shape == (2, 308, 8)  # 4x: ComfyUI's limit, still batched
    assert join_contexts([chunks(5), chunks(1)]) is None  # 5x: run apart
    assert join_contexts([chunks(28), chunks(27)]) is None  # lcm 756 chunks: run apart


@pytest.mark.parametrize("text", ["a (fox:nan) in snow", "(fox:inf)", "(fox:-inf)", "(fox:1e30)", "((fox:11))"])
def test_weights_must_be_finite_and_in_range(text):
    from flipbook_pack.core.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match=r"must be finite numbers from -10.0 to 10.0 \(0-2 is usual"):
        parse_weights(text)


def test_in_range_and_non_numeric_weights_still_parse_as_comfyui():
    assert parse_weights("(fox:-0.5)") == [("fox", -0.5)]
    assert parse_weights("(fox:10)") == [("fox", 10.0)]
    assert parse_weights("(a:b)") == [("a:b", pytest.approx(1.1))]  # not a number: plain text, x1.1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab (:)\\1.5-einf", max_size=40))
def test_any_prompt_parses_to_finite_weights_or_a_typed_error(text):
    from flipbook_pack.core.errors import InvalidSettingError

    try:
        parts = parse_weights(text)
    except InvalidSettingError as exc:
        assert "\n" not in str(exc)
        return
    assert all(isinstance(part, str) and math.isfinite(weight) for part, weight in parts)
