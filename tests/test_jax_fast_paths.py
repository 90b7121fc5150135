"""The speed-ups in tnt_jax.model compute docs/design.md's formulas: each fast path against the plain
expression it replaces, values and gradients, within float32 round-off."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tnt_jax.model import attend, gated, l2norm


def plain_l2norm(x, axis=-1):
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def plain_attend(q, k, v, mask, scale):
    logits = jnp.einsum("blhk,bshk->bhls", q, k) * scale
    m = mask[:, None]
    logits = jnp.where(m, logits, jnp.finfo(logits.dtype).min)
    probs = jnp.where(m, jax.nn.softmax(logits, axis=-1), 0.0)
    return jnp.einsum("bhls,bshk->blhk", probs, v)


def vjp(f, x, g):
    return jax.vjp(f, x)[1](g)[0]


@pytest.mark.parametrize("axis", [-1, 0])
def test_l2norm_value_and_gradient_match_autodiff(rng, axis):
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32).at[2].set(0.0).at[:, 3].set(0.0)
    g = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    np.testing.assert_allclose(l2norm(x, axis), plain_l2norm(x, axis), rtol=1e-6, atol=1e-7)
    fast, ref = vjp(lambda t: l2norm(t, axis), x, g), vjp(lambda t: plain_l2norm(t, axis), x, g)
    np.testing.assert_allclose(fast, ref, rtol=2e-6, atol=1e-6)  # zero rows: both g / 1e-12


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_gated_matches_autodiff_of_the_plain_formula(activation, rng):
    """`gated`'s hand-written gradient is autodiff's, checked in float64 (an identity)."""
    with jax.enable_x64(True):
        uv = jnp.asarray(rng.normal(scale=3.0, size=(3, 5, 16)), jnp.float64)
        g = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float64)
        act = (lambda v: jax.nn.gelu(v, approximate=False)) if activation == "gelu" else jax.nn.silu
        plain = lambda t: t[..., :8] * act(t[..., 8:])  # noqa: E731
        np.testing.assert_allclose(gated(uv, activation), plain(uv), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(vjp(lambda t: gated(t, activation), uv, g), vjp(plain, uv, g),
                                   rtol=1e-12, atol=1e-12)


def test_attend_matches_the_plain_formula_and_zeroes_fully_masked_rows(rng):
    B, L, H, K = 2, 6, 2, 4
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(3))
    valid = np.ones((B, L), bool)
    valid[0, :2] = False  # the first two keys of row 0 are padding
    mask = jnp.asarray(np.tril(np.ones((L, L), bool))[None] & valid[:, None, :])
    scale = math.sqrt(K)
    fast, ref = attend(q, k, v, mask, scale), plain_attend(q, k, v, mask, scale)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(fast)[0, :2] == 0.0)  # no visible key: exactly 0 (docs/design.md)
    g = jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32)
    for i in range(3):
        def at(t, i=i, f=attend):
            args = [q, k, v]
            args[i] = t
            return f(*args, mask, scale)
        np.testing.assert_allclose(vjp(at, [q, k, v][i], g),
                                   vjp(lambda t, i=i: at(t, i, plain_attend), [q, k, v][i], g),
                                   rtol=1e-5, atol=1e-5)
