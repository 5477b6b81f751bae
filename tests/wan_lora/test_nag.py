"""wan_lora/nag.py: NAG on the tiny Wan transformer loaded through the real loader. The formula equals a
direct per-token computation; an identical negative is a no-op; a different one changes the output; scale <= 1
and sigma < sigma_end are off; CFG negative rows are untouched; negative K/V are computed once per run."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core import denoisers
from flipbook_pack.wan_lora import tiny_transformer as T
from flipbook_pack.wan_lora.conditioning import WanContext, join_contexts, wan_forward
from flipbook_pack.wan_lora.nag import NagSettings, nag_applied, nag_combine
from flipbook_pack.wan_lora.transformer import inspect_wan_transformer, transformer_component

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    path = T.write_tiny_wan(tmp_path_factory.mktemp("wan") / "wan.safetensors", storage="fp32")
    component = transformer_component(inspect_wan_transformer(path), load_device=CPU, offload_device=CPU,
                                      dtype=torch.float32)
    component.materialize()
    return component.module


def _text(seed, tokens=6):
    context = torch.zeros(1, 512, 32)
    context[:, :tokens] = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(seed))
    return context


X = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))


def _velocity(model, context, *, negative=None, settings=NagSettings(), sigma=0.9, nag_rows=True):
    t = torch.tensor([sigma * 1000.0])
    positive = WanContext.of(context, nag=nag_rows)
    if negative is None:
        return wan_forward(model)(X, t, positive)
    with nag_applied(model, negative_embeddings=negative, settings=settings) as state:
        return wan_forward(model, state)(X, t, positive)


def test_formula_equals_a_direct_computation():
    generator = torch.Generator().manual_seed(2)
    positive, negative = torch.randn(2, 5, 12, generator=generator), torch.randn(2, 5, 12, generator=generator)
    scale, tau, alpha = 6.0, 2.5, 0.25
    ours = nag_combine(positive, negative, scale=scale, tau=tau, alpha=alpha)
    expected = torch.empty_like(positive)
    for b in range(2):
        for token in range(5):
            z_pos, z_neg = positive[b, token].double(), negative[b, token].double()
            z = z_pos + (scale - 1) * (z_pos - z_neg)  # the paper's Z+ + phi (Z+ - Z-), phi = s - 1
            ratio = z.abs().sum() / z_pos.abs().sum()
            if ratio > tau:
                z = z * tau / ratio
            expected[b, token] = (alpha * z + (1 - alpha) * z_pos).float()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours != positive).any()


def test_identical_negative_is_a_no_op(transformer):
    context = _text(3)
    torch.testing.assert_close(_velocity(transformer, context, negative=context), _velocity(transformer, context),
                               atol=1e-5, rtol=1e-5)


def test_a_different_negative_changes_the_output(transformer):
    context = _text(3)
    plain = _velocity(transformer, context)
    guided = _velocity(transformer, context, negative=_text(4))
    assert (guided - plain).abs().max() > 1e-2 * plain.abs().max()


def test_scale_at_most_one_and_below_sigma_end_are_off(transformer):
    context, negative = _text(3), _text(4)
    plain = _velocity(transformer, context)
    assert torch.equal(_velocity(transformer, context, negative=negative, settings=NagSettings(scale=1.0)), plain)
    late = NagSettings(sigma_end=0.75)
    for sigma, guided in ((0.5, False), (0.8, True)):
        nag = _velocity(transformer, context, negative=negative, settings=late, sigma=sigma)
        assert torch.equal(nag, _velocity(transformer, context, sigma=sigma)) is not guided


def test_cfg_negative_rows_get_no_nag(transformer):
    """cfg > 1 with NAG: the batch is [CFG negative, positive]; only the positive row is guided."""
    context, negative = _text(3), _text(4)
    both = join_contexts([WanContext.of(negative, nag=False), WanContext.of(context, nag=True)])
    t = torch.tensor([900.0])
    with nag_applied(transformer, negative_embeddings=negative, settings=NagSettings()) as state:
        batch = wan_forward(transformer, state)(torch.cat([X, X]), t, both)
    # batched and single-row matmuls round differently in the last bits
    torch.testing.assert_close(batch[:1], _velocity(transformer, negative, nag_rows=False), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[1:], _velocity(transformer, context, negative=negative), atol=1e-4, rtol=1e-4)


def test_negative_keys_values_once_per_run_and_processors_restored(transformer):
    calls = []
    hook = transformer.blocks[0].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    originals = [block.attn2.processor for block in transformer.blocks]
    try:
        with nag_applied(transformer, negative_embeddings=_text(4), settings=NagSettings()) as state:
            denoiser = denoisers.Denoiser(forward=wan_forward(transformer, state),
                                          parameterization=denoisers.flow_prediction(),
                                          positive=WanContext.of(_text(3), nag=True))
            for sigma in (0.9, 0.6, 0.3):
                denoiser(X, torch.tensor(sigma))
            assert state.calls_with_nag == 3
        with pytest.raises(RuntimeError), nag_applied(transformer, negative_embeddings=_text(4),
                                                      settings=NagSettings()):
            raise RuntimeError("cancelled")
    finally:
        hook.remove()
    assert len(calls) == 3 + 1  # the positive text each step, the negative once
    assert [block.attn2.processor for block in transformer.blocks] == originals


def test_chunked_combination_equals_the_whole(monkeypatch):
    from flipbook_pack.wan_lora import nag

    generator = torch.Generator().manual_seed(5)
    positive, negative = torch.randn(2, 10, 6, generator=generator), torch.randn(2, 10, 6, generator=generator)
    whole = nag_combine(positive, negative, scale=11.0, tau=2.5, alpha=0.25)
    monkeypatch.setattr(nag, "CHUNK_TOKENS", 3)
    assert torch.equal(nag_combine(positive, negative, scale=11.0, tau=2.5, alpha=0.25), whole)
