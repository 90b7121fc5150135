"""tnt_torch.model: masks, causality, padding, validation, canonical export/import."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ARCH_NORMS, random_tokens, tiny_config

from tnt.params import param_specs
from tnt_torch.model import Mask, TnT, attend, l2norm, load_canonical, loss_fn, to_canonical


def logits_of(model: TnT, enc: np.ndarray | None, dec: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        e = None if enc is None else torch.from_numpy(enc)
        return model(e, torch.from_numpy(dec)).numpy()


def inputs(cfg, rng, batch=2, enc_len=10, dec_len=8):
    enc = random_tokens(rng, (batch, enc_len)) if cfg.has_encoder else None
    return enc, random_tokens(rng, (batch, dec_len))


@pytest.mark.parametrize("arch,norm", ARCH_NORMS)
def test_causal_later_decoder_token_does_not_change_earlier_logits(arch, norm, rng):
    cfg = tiny_config(arch, norm)
    model = TnT(cfg, seed=0)
    enc, dec = inputs(cfg, rng)
    before = logits_of(model, enc, dec)
    dec2 = dec.copy()
    dec2[:, 5] = (dec2[:, 5] + 1 - 3) % (cfg.vocab_size - 3) + 3
    after = logits_of(model, enc, dec2)
    np.testing.assert_allclose(after[:, :5], before[:, :5], atol=1e-6)
    assert np.abs(after[:, 5:] - before[:, 5:]).max() > 1e-4


@pytest.mark.parametrize("arch,norm", ARCH_NORMS)
def test_extra_padding_changes_nothing_else(arch, norm, rng):
    cfg = tiny_config(arch, norm)
    model = TnT(cfg, seed=1)
    enc, dec = inputs(cfg, rng)
    base = logits_of(model, enc, dec)
    pad_dec = np.concatenate([dec, np.zeros((2, 4), np.int32)], axis=1)
    pad_enc = None if enc is None else np.concatenate([enc, np.zeros((2, 5), np.int32)], axis=1)
    padded = logits_of(model, pad_enc, pad_dec)
    np.testing.assert_allclose(padded[:, :dec.shape[1]], base, atol=2e-6)
    assert np.isfinite(padded).all()


@pytest.mark.parametrize("norm", ["ngpt", "rmsnorm"])
def test_encoder_output_reaches_decoder(norm, rng):
    cfg = tiny_config("encoder_decoder", norm)
    model = TnT(cfg, seed=2)
    enc, dec = inputs(cfg, rng)
    enc2 = random_tokens(rng, enc.shape)
    assert np.abs(logits_of(model, enc, dec) - logits_of(model, enc2, dec)).max() > 1e-4


def test_fully_masked_query_rows_are_exactly_zero_and_finite():
    q, k, v = (torch.randn(2, 2, 3, 4) for _ in range(3))
    keep = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    keep[0, :, 1] = False  # batch 0, query 1 sees no key
    y = attend(q, k, v, Mask(False, keep), 0.5)
    assert torch.all(y[0, :, 1] == 0)
    assert torch.isfinite(y).all()
    # A fully padded encoder sequence, and a decoder that starts with pad: no NaN anywhere.
    cfg = tiny_config("encoder_decoder", "ngpt")
    model = TnT(cfg, seed=0)
    enc = np.zeros((2, 6), np.int32)
    enc[1] = 5
    dec = np.array([[0, 5, 6, 7], [4, 5, 6, 0]], np.int32)
    enc_t = torch.from_numpy(enc)
    out = model.encode(enc_t)
    assert torch.isfinite(out).all()
    batch = {"enc_tokens": enc_t, "dec_tokens": torch.from_numpy(dec),
             "labels": torch.from_numpy(dec)}
    loss, count = loss_fn(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and int(count) == 6
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_l2norm_matches_f_normalize_forward_and_backward():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    for dim in (-1, 0):
        ours, ref = l2norm(x, dim), F.normalize(x, dim=dim)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
        (grad_ours,) = torch.autograd.grad(ours, x, g)
        (grad_ref,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-6)
    zero = torch.zeros(2, 3, requires_grad=True)
    y = l2norm(zero)
    (grad,) = torch.autograd.grad(y, zero, torch.ones(2, 3))
    assert torch.all(y == 0) and torch.isfinite(grad).all()


def _value_and_grad(fn, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().requires_grad_()
    y = fn(x)
    return y.detach(), torch.autograd.grad(y, x, g)[0]


def test_rope_is_the_rotation_of_half_pairs_with_autograds_gradient():
    """`RoPE.apply`'s written-out backward (`_Rotate`) is autograd's gradient of the plain
    formula, at 0..L-1 and at given positions: an identity, checked in float64."""
    from tnt_torch.model import RoPE

    gen = torch.Generator().manual_seed(0)
    cfg = tiny_config(d_model=16, n_heads=2)
    L, K = 6, cfg.head_dim
    rope = RoPE(cfg, L)
    cos, sin = (t.double() for t in rope.tables)
    rope.tables = (cos, sin)
    x = torch.randn(2, L, 3, 2, K, generator=gen, dtype=torch.float64)
    g = torch.randn(2, L, 3, 2, K, generator=gen, dtype=torch.float64)
    positions = torch.tensor([[5, 0, 3, 3, 1, 2], [0, 1, 2, 3, 4, 5]])
    for pos, (c, s) in ((None, (cos[:, None, None], sin[:, None, None])),
                        (positions, (cos[positions][:, :, None, None], sin[positions][:, :, None, None]))):
        def plain(t, c=c, s=s):
            t1, t2 = t.chunk(2, -1)
            return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)
        ours, ref = _value_and_grad(lambda t, pos=pos: rope.apply(t, pos), x, g), _value_and_grad(plain, x, g)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(rope.apply(x), plain(x, cos[:, None, None], sin[:, None, None]),
                                   rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_gated_is_autograds_gradient_of_the_plain_formula(activation):
    """`gated`'s backward writes both halves' gradients into one tensor (`_Gated`); they are
    autograd's of `u * act(v)`, checked in float64 (an identity)."""
    from tnt_torch.model import gated

    gen = torch.Generator().manual_seed(0)
    uv = 3 * torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    act = (lambda v: F.gelu(v, approximate="none")) if activation == "gelu" else F.silu

    def plain(t):
        return t[..., :8] * act(t[..., 8:])
    for a, b in zip(_value_and_grad(lambda t: gated(t, activation), uv, g),
                    _value_and_grad(plain, uv, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(gated(uv, activation), plain(uv), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("arch,norm", ARCH_NORMS)
def test_init_follows_the_shared_table(arch, norm):
    cfg = tiny_config(arch, norm)
    params = to_canonical(TnT(cfg, seed=0))
    specs = param_specs(cfg)
    assert list(params) == list(specs)
    for name, spec in specs.items():
        p = params[name]
        assert p.shape == spec.shape and p.dtype == np.float32
        if spec.init_std is None:
            assert np.all(p == spec.init_value), name
        elif spec.project_axis is not None:
            np.testing.assert_allclose(np.linalg.norm(p, axis=spec.project_axis), 1.0, atol=1e-6)
        else:
            assert abs(p.std() - spec.init_std) < 0.3 * spec.init_std, name


def test_same_seed_same_init_and_different_seed_differs():
    cfg = tiny_config()
    a, b, c = (to_canonical(TnT(cfg, seed=s)) for s in (3, 3, 4))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["decoder.embed"], c["decoder.embed"])


def test_canonical_round_trip_and_clear_errors():
    cfg = tiny_config()
    src, dst = TnT(cfg, seed=0), TnT(cfg, seed=1)
    params = to_canonical(src)
    load_canonical(dst, params)
    assert all(np.array_equal(v, to_canonical(dst)[n]) for n, v in params.items())
    with pytest.raises(KeyError, match="missing: decoder.embed"):
        load_canonical(dst, {k: v for k, v in params.items() if k != "decoder.embed"})
    with pytest.raises(KeyError, match="unexpected: extra.w"):
        load_canonical(dst, {**params, "extra.w": np.zeros(3)})
    with pytest.raises(ValueError, match="lm_head has shape"):
        load_canonical(dst, {**params, "lm_head": params["lm_head"].T})


def test_bad_inputs_raise_value_errors_naming_the_input(rng):
    cfg = tiny_config()
    model = TnT(cfg, seed=0)
    enc, dec = inputs(cfg, rng)
    bad = dec.copy()
    bad[1, 2] = cfg.vocab_size
    with pytest.raises(ValueError, match=r"dec_tokens contain token id 40 at index \(1, 2\)"):
        model(torch.from_numpy(enc), torch.from_numpy(bad))
    with pytest.raises(ValueError, match="enc_tokens contain token id -"):
        model(torch.from_numpy(enc - 10), torch.from_numpy(dec))
    with pytest.raises(ValueError, match="dec_tokens has length 17, longer than the model's "
                                         "maximum 16"):
        model(torch.from_numpy(enc), torch.from_numpy(random_tokens(rng, (1, 17))))
    with pytest.raises(ValueError, match="enc_tokens has length 20"):
        model(torch.from_numpy(random_tokens(rng, (1, 20))), torch.from_numpy(dec[:1]))
    with pytest.raises(ValueError, match="needs enc_tokens"):
        model(None, torch.from_numpy(dec))


def test_reference_rope_reproduces_the_ngpt_code():
    """`rope_mode="ngpt_reference"`: out[2i] = -x[2i+1] cos_half[i], out[2i+1] = x[2i] sin_half[i],
    with the reference's interleaved sinusoids split by halves (import compatibility only)."""
    import dataclasses

    from tnt_torch.model import RoPE

    L, K = 5, 8
    x = np.random.default_rng(0).standard_normal((2, L, 3, K)).astype(np.float32)
    inv_freq = np.exp(np.arange(0, K, 2) * (-np.log(10000.0) / K))
    angles = np.arange(L)[:, None] * inv_freq[None, :]
    emb = np.zeros((L, K))
    emb[:, 0::2], emb[:, 1::2] = np.sin(angles), np.cos(angles)
    sin_half, cos_half = emb[:, :K // 2], emb[:, K // 2:]
    expected = np.empty_like(x)
    expected[..., 0::2] = -x[..., 1::2] * cos_half[:, None]
    expected[..., 1::2] = x[..., 0::2] * sin_half[:, None]
    cfg = dataclasses.replace(tiny_config(d_model=3 * K, n_heads=3), rope_mode="ngpt_reference")
    out = RoPE(cfg, L).apply(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_rope_mode_selects_the_transform(rng):
    import dataclasses

    cfg = tiny_config("decoder_only", "ngpt")
    ref_cfg = dataclasses.replace(cfg, rope_mode="ngpt_reference")
    params = to_canonical(TnT(cfg, seed=0))
    a = load_canonical(TnT(cfg), params)
    b = load_canonical(TnT(ref_cfg), params)
    _, dec = inputs(cfg, rng)
    la, lb = logits_of(a, None, dec), logits_of(b, None, dec)
    assert np.isfinite(lb).all() and np.abs(la - lb).max() > 1e-3


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
def test_prefill_and_decode_steps_with_the_cache_equal_the_full_forward(arch, norm, rng):
    """`TnT.extend` on a prompt, then one token at a time, gives the full forward's logits."""
    cfg = tiny_config(arch, norm)
    model = TnT(cfg, seed=3)
    enc, dec = inputs(cfg, rng)
    dec = torch.from_numpy(dec).long()
    full = logits_of(model, enc, dec.numpy())
    L = dec.shape[1]
    with torch.no_grad():
        cache = model.start_cache(2, L + 2, None if enc is None else torch.from_numpy(enc).long())
        logits, cache = model.extend(dec[:, :3], torch.arange(3).expand(2, 3), cache)
        got = [logits]
        for t in range(3, L):
            logits, cache = model.extend(dec[:, t:t + 1], torch.full((2, 1), t), cache)
            got.append(logits)
        np.testing.assert_allclose(torch.cat(got, 1).numpy(), full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="within the cache"):
            model.extend(dec[:, :1], torch.full((2, 1), L + 2), cache)
