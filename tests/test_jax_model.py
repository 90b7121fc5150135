"""Properties of the Flax NNX model (docs/design.md, "Forward pass", "RoPE", "Masks")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ARCH_NORMS, random_tokens, tiny_config

from tnt.params import param_specs
from tnt_jax.model import (
    RoPE,
    TnT,
    attend,
    load_canonical,
    merge_params,
    split_params,
    to_canonical,
)


def make(arch="encoder_decoder", norm="ngpt", seed=0, **kw) -> TnT:
    return TnT(tiny_config(arch, norm, **kw), nnx.Rngs(seed))


def forward(model, enc, dec):
    return np.asarray(model(None if enc is None else jnp.asarray(enc), jnp.asarray(dec)))


def test_rope_is_a_rotation_and_depends_on_position_difference(rng):
    dh, L = 8, 12
    rope = RoPE(tiny_config(d_model=2 * dh, n_heads=2), L)
    x = jnp.asarray(rng.normal(size=(1, L, 1, dh)), jnp.float32)
    y = rope.apply(x)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-6)
    q = jnp.asarray(np.broadcast_to(rng.normal(size=dh), (1, L, 1, dh)), jnp.float32)
    k = jnp.asarray(np.broadcast_to(rng.normal(size=dh), (1, L, 1, dh)), jnp.float32)
    qr, kr = rope.apply(q)[0, :, 0], rope.apply(k)[0, :, 0]
    dots = np.asarray(qr @ kr.T)
    for offset in (0, 1, 3):
        diag = np.diagonal(dots, offset)
        np.testing.assert_allclose(diag, diag[0], atol=1e-5)
    assert abs(dots[0, 1] - dots[0, 2]) > 1e-3  # it does rotate (NVIDIA/ngpt#10)
    x1, x2 = np.asarray(x[0, 1, 0, :dh // 2]), np.asarray(x[0, 1, 0, dh // 2:])
    c, s = np.cos(1.0), np.sin(1.0)  # position 1, frequency index 0: angle 1
    np.testing.assert_allclose(np.asarray(y[0, 1, 0, 0]), x1[0] * c - x2[0] * s, rtol=1e-5)


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
def test_init_puts_every_ngpt_matrix_on_the_unit_sphere(arch, norm):
    model = make(arch, norm)
    params = to_canonical(model)
    for name, spec in param_specs(model.cfg).items():
        if spec.project_axis is not None:
            np.testing.assert_allclose(np.linalg.norm(params[name], axis=spec.project_axis), 1.0,
                                       atol=1e-6, err_msg=name)
        elif spec.init_std is None:
            assert (params[name] == spec.init_value).all(), name


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
@pytest.mark.parametrize("jit", [False, True])
def test_causality_later_tokens_do_not_change_earlier_logits(arch, norm, jit, rng):
    model = make(arch, norm)
    enc = random_tokens(rng, (2, 7)) if arch == "encoder_decoder" else None
    dec = random_tokens(rng, (2, 9))
    changed = dec.copy()
    changed[:, 5:] = random_tokens(rng, (2, 4))
    f = nnx.jit(lambda m, e, d: m(e, d)) if jit else (lambda m, e, d: m(e, d))
    a = np.asarray(f(model, None if enc is None else jnp.asarray(enc), jnp.asarray(dec)))
    b = np.asarray(f(model, None if enc is None else jnp.asarray(enc), jnp.asarray(changed)))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-4


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
def test_causality_through_gradients(arch, norm, rng):
    """The logits at position 3 have zero gradient with respect to decoder inputs after 3."""
    graphdef, params = split_params(make(arch, norm))
    enc = jnp.asarray(random_tokens(rng, (1, 5))) if arch == "encoder_decoder" else None
    dec = jnp.asarray(np.arange(3, 11, dtype=np.int32)[None])  # each position owns its row

    def logits_at_3(delta_LxD):
        table = params["decoder.embed"].at[dec[0]].add(delta_LxD)
        return merge_params(graphdef, {**params, "decoder.embed": table})(enc, dec)[0, 3].sum()

    grads = np.asarray(jax.jit(jax.grad(logits_at_3))(jnp.zeros((8, 32))))  # one compile, not one per op
    assert np.abs(grads[4:]).max() == 0.0
    assert np.abs(grads[:4]).max() > 0.0


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
def test_padding_changes_nothing_else(arch, norm, rng):
    model = make(arch, norm)
    enc = random_tokens(rng, (2, 6))
    dec = random_tokens(rng, (2, 7))
    pad = model.cfg.pad_id
    base = forward(model, enc if arch == "encoder_decoder" else None, dec)
    enc_p = np.concatenate([enc, np.full((2, 4), pad, np.int32)], 1)
    dec_p = np.concatenate([dec, np.full((2, 3), pad, np.int32)], 1)
    padded = forward(model, enc_p if arch == "encoder_decoder" else None, dec_p)
    np.testing.assert_allclose(padded[:, :7], base, atol=2e-5)
    assert np.isfinite(padded).all()


def test_encoder_output_reaches_the_decoder(rng):
    model = make("encoder_decoder", "ngpt")
    dec = random_tokens(rng, (1, 5))
    a = forward(model, random_tokens(rng, (1, 6)), dec)
    b = forward(model, random_tokens(rng, (1, 6)), dec)
    assert np.abs(a - b).max() > 1e-4


def test_fully_masked_query_rows_output_exactly_zero(rng):
    q = jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32)
    mask = jnp.asarray(np.array([[[True, False], [False, False], [True, True]]]))
    y = attend(q, q[:, :2], q[:, :2] + 1.0, mask, 0.5)
    assert (np.asarray(y[0, 1]) == 0.0).all() and np.isfinite(np.asarray(y)).all()
    # an all-pad encoder input still gives finite logits
    model = make("encoder_decoder", "ngpt")
    out = forward(model, np.zeros((1, 4), np.int32), random_tokens(rng, (1, 3)))
    assert np.isfinite(out).all()


def test_bad_inputs_are_refused_with_names(rng):
    model = make("encoder_decoder", "ngpt")
    with pytest.raises(ValueError, match="dec_tokens contain token id 40"):
        forward(model, random_tokens(rng, (1, 4)), np.array([[3, 40]], np.int32))
    with pytest.raises(ValueError, match="enc_tokens contain token id -2"):
        forward(model, np.array([[3, -2]], np.int32), random_tokens(rng, (1, 2)))
    with pytest.raises(ValueError, match="enc_tokens has length 17, longer than the model's maximum 16"):
        forward(model, random_tokens(rng, (1, 17)), random_tokens(rng, (1, 2)))
    with pytest.raises(ValueError, match="dec_tokens has length 20"):
        forward(model, random_tokens(rng, (1, 2)), random_tokens(rng, (1, 20)))


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
def test_canonical_roundtrip_and_clear_errors(arch, norm, rng):
    a, b = make(arch, norm, seed=0), make(arch, norm, seed=1)
    params = to_canonical(a)
    assert all(v.dtype == np.float32 for v in params.values())
    load_canonical(b, params)
    enc = random_tokens(rng, (1, 4)) if arch == "encoder_decoder" else None
    dec = random_tokens(rng, (1, 5))
    np.testing.assert_array_equal(forward(a, enc, dec), forward(b, enc, dec))
    missing = dict(params)
    missing.pop("lm_head")
    with pytest.raises(KeyError, match="missing: lm_head"):
        load_canonical(b, missing)
    with pytest.raises(KeyError, match="unexpected: decoder.extra"):
        load_canonical(b, {**params, "decoder.extra": np.zeros(1)})
    wrong = {**params, "decoder.embed": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"decoder.embed has shape \(3, 3\), expected \(40, 32\)"):
        load_canonical(b, wrong)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_activation_is_exact_erf_gelu_or_silu(activation, rng):
    model = make("decoder_only", "rmsnorm", activation=activation)
    x = jnp.asarray(rng.normal(size=(1, 2, 32)), jnp.float32)
    mlp = model.decoder.layers[0].mlp
    uv = np.asarray(x @ mlp.w_in[...])
    u, v = uv[..., :128], uv[..., 128:]
    from math import erf

    act = (np.vectorize(lambda t: 0.5 * t * (1 + erf(t / np.sqrt(2))))(v) if activation == "gelu"
           else v / (1 + np.exp(-v)))
    np.testing.assert_allclose(np.asarray(mlp(x)), (u * act) @ np.asarray(mlp.w_out[...]),
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
def test_prefill_and_decode_steps_with_the_cache_equal_the_full_forward(arch, norm, rng):
    """`TnT.extend` on a prompt, then one token at a time, gives the full forward's logits."""
    model = make(arch, norm)
    enc = random_tokens(rng, (2, 7)) if arch == "encoder_decoder" else None
    dec = random_tokens(rng, (2, 6))
    full = forward(model, enc, dec)
    cache = model.start_cache(2, 8, None if enc is None else jnp.asarray(enc))
    logits, cache = model.extend(jnp.asarray(dec[:, :3]), jnp.tile(jnp.arange(3), (2, 1)), cache)
    got = [np.asarray(logits)]
    graphdef, params = split_params(model)
    step = jax.jit(lambda p, tok, pos, c: merge_params(graphdef, p).extend(tok, pos, c))
    for t in range(3, 6):  # compiled: a pure function of parameters, tokens and cache
        logits, cache = step(params, jnp.asarray(dec[:, t:t + 1]), jnp.full((2, 1), t), cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="within the cache"):
        model.extend(jnp.asarray(dec[:, :1]), jnp.full((2, 1), 8), cache)
