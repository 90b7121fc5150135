"""Training follows the nGPT reference's trajectory, in float64.

The reference (NVIDIA/ngpt's model.py and train.py, as published) stores each scaler at `p / m`
(`m = init/scale`, `tnt.params`' eigen_lr) and multiplies it by `m` in the forward; it feeds the
embedding rows into the first block as they are and computes `norm(h)` with a plain division
inside every residual update; it clips the global norm of the stored gradients, takes an AdamW
step (eps 1e-8, no weight decay for nGPT) and renormalizes the matrices. The loop below does that
in its own words, with its own model function (JAX autodiff through plain `x / ||x||`, the rotary
embedding TnT uses), and both frameworks' model + optimizer must land on the same parameters.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import random_tokens, tiny_config

from tnt.config import TrainConfig
from tnt.params import ALPHA_INIT, param_specs
from tnt.reference import convert_reference
from tnt.rope import reference_tables, rotate_half_tables
from tnt.schedule import learning_rate
from tnt_jax import model as jax_model
from tnt_jax.optim import build_optimizer
from tnt_jax.train import TrainState, make_train_step
from tnt_torch import model as torch_model
from tnt_torch.optim import TnTOptimizer

STEPS = 3


def config(arch):
    return tiny_config(arch, "ngpt", n_decoder_layers=1 if arch == "encoder_decoder" else 2)


def plain_norm(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def rotate(x_BxLxHxK, L, rope_mode="rotate"):
    """RoPE, or the public nGPT code's transform for `rope_mode="ngpt_reference"` (its pairs
    (-x[2i+1], x[2i]) times its halves (cos_half[i], sin_half[i]), as tnt.rope describes)."""
    if rope_mode == "ngpt_reference":
        sin_half, cos_half = (jnp.asarray(t, x_BxLxHxK.dtype)[:L, None, :]
                              for t in reference_tables(L, x_BxLxHxK.shape[-1], 1e4))
        pairs = jnp.stack([-x_BxLxHxK[..., 1::2] * cos_half, x_BxLxHxK[..., ::2] * sin_half], -1)
        return pairs.reshape(x_BxLxHxK.shape)
    cos, sin = (jnp.asarray(t)[:L, None, :] for t in rotate_half_tables(L, x_BxLxHxK.shape[-1], 1e4))
    x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_loss(p, batch, cfg, has_pad=True):
    """The nGPT forward on effective parameters `p`, every normalization a plain division; with
    `has_pad` its vocabulary is TnT's real tokens (the pad's column deleted), otherwise all of
    `p`'s ids (a reference vocabulary, which has no pad). It broadcasts the way the reference's
    torch code does, so rank promotion is allowed here (the suite raises on it elsewhere, to keep
    TnT's own model explicit)."""
    with jax.numpy_rank_promotion("allow"):
        return _reference_loss(p, batch, cfg, has_pad)


def _reference_loss(p, batch, cfg, has_pad):
    H, K = cfg.n_heads, cfg.head_dim

    def attention(pre, x, kv, causal, rope):
        q = (x @ p[f"{pre}.wq"]).reshape(*x.shape[:2], H, K)
        k = (kv @ p[f"{pre}.wk"]).reshape(*kv.shape[:2], H, K)
        v = (kv @ p[f"{pre}.wv"]).reshape(*kv.shape[:2], H, K)
        if rope:
            q, k = rotate(q, q.shape[1], cfg.rope_mode), rotate(k, k.shape[1], cfg.rope_mode)
        s_qk = p[f"{pre}.s_qk"].reshape(H, K)
        q, k = s_qk * plain_norm(q), s_qk * plain_norm(k)
        scores = jnp.einsum("blhk,bshk->bhls", q, k) * math.sqrt(K)
        if causal:
            L = x.shape[1]
            scores = jnp.where(jnp.tril(jnp.ones((L, L), bool)), scores, -jnp.inf)
        y = jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(scores, axis=-1), v)
        return y.reshape(x.shape) @ p[f"{pre}.wo"]

    def mlp(pre, x):
        u, v = jnp.split(x @ p[f"{pre}.w_in"] * (p[f"{pre}.s_uv"] * math.sqrt(cfg.d_model)), 2,
                         axis=-1)
        act = jax.nn.gelu(v, approximate=False) if cfg.activation == "gelu" else jax.nn.silu(v)
        return (u * act) @ p[f"{pre}.w_out"]

    def residual(h, f, alpha):  # the reference's A_norm, B_norm, lerp, norm
        a, b = plain_norm(h), plain_norm(f)
        return plain_norm(a + jnp.abs(alpha) * (b - a))

    def stack(name, n_layers, tokens, causal, enc=None):
        h = p[f"{name}.embed"][tokens]  # as they are: no normalization
        for i in range(n_layers):
            pre = f"{name}.layers.{i}"
            h = residual(h, attention(f"{pre}.attn", h, h, causal, True), p[f"{pre}.attn.alpha"])
            if enc is not None:
                h = residual(h, attention(f"{pre}.cross", h, enc, False, False),
                             p[f"{pre}.cross.alpha"])
            h = residual(h, mlp(f"{pre}.mlp", h), p[f"{pre}.mlp.alpha"])
        return h

    enc = None
    if cfg.has_encoder:
        enc = stack("encoder", cfg.n_encoder_layers, batch["enc_tokens"], False)
    h = stack("decoder", cfg.n_decoder_layers, batch["dec_tokens"], True, enc)
    logits, labels = p["s_z"] * (h @ p["lm_head"]), batch["labels"]
    if has_pad:  # the batch holds no pad label: the ids after the pad move down by one
        logits = jnp.delete(logits, cfg.pad_id, axis=-1, assume_unique_indices=True)
        labels = labels - (labels > cfg.pad_id)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def reference_training(eff, batch, cfg, train, steps=STEPS, has_pad=True):
    """The reference's loop on stored parameters `eff / m`; returns the effective parameters after
    each step and the stored gradients' global norms (before clipping)."""
    specs, t = param_specs(cfg), train.resolved(cfg.norm)
    m = {n: s.eigen_lr for n, s in specs.items()}
    stored = {n: v / m[n] for n, v in eff.items()}
    first = {n: jnp.zeros_like(v) for n, v in stored.items()}
    second = {n: jnp.zeros_like(v) for n, v in stored.items()}
    loss_of_stored = jax.jit(jax.grad(
        lambda s: reference_loss({n: v * m[n] for n, v in s.items()}, batch, cfg, has_pad)))
    norms = []
    for step in range(1, steps + 1):
        g = loss_of_stored(stored)
        total = float(jnp.sqrt(sum(jnp.sum(v * v) for v in g.values())))
        norms.append(total)
        g = {n: v * min(1.0, t.grad_clip / total) for n, v in g.items()}
        lr = learning_rate(step - 1, t.lr, t.min_lr, t.warmup_steps, t.horizon)
        for n in stored:
            first[n] = t.beta1 * first[n] + (1 - t.beta1) * g[n]
            second[n] = t.beta2 * second[n] + (1 - t.beta2) * g[n] ** 2
            adam = (first[n] / (1 - t.beta1 ** step)) / (
                jnp.sqrt(second[n] / (1 - t.beta2 ** step)) + t.eps)
            stored[n] = stored[n] - lr * adam
            if specs[n].project_axis is not None:  # normalize_matrices()
                ax = specs[n].project_axis
                stored[n] = stored[n] / jnp.linalg.norm(stored[n], axis=ax, keepdims=True)
    return {n: v * m[n] for n, v in stored.items()}, norms


def initial(cfg, rng):
    """float64 parameters on the sphere (the reference normalizes before training) and a batch."""
    _, params = jax_model.split_params(jax_model.TnT(cfg, nnx.Rngs(0)))
    specs = param_specs(cfg)
    eff = on_sphere(params, cfg)
    for n, v in eff.items():
        if specs[n].project_axis is None:  # scalers away from their init: distinct gradients
            eff[n] = v * (1 + 0.2 * rng.uniform(-1, 1, v.shape))
    dec = random_tokens(rng, (4, 9), cfg.vocab_size)
    batch = {"dec_tokens": dec[:, :-1], "labels": dec[:, 1:]}
    if cfg.has_encoder:
        batch["enc_tokens"] = random_tokens(rng, (4, 6), cfg.vocab_size)
    return eff, batch


def jax_training(eff, batch, cfg, train, steps=STEPS):
    graphdef, _ = jax_model.split_params(jax_model.TnT(cfg, nnx.Rngs(0)))
    tx = build_optimizer(cfg, train)
    params = {n: jnp.asarray(v) for n, v in eff.items()}
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    step = make_train_step(graphdef, tx)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    for _ in range(steps):
        state, _ = step(state, jbatch)
    return {n: np.asarray(v) for n, v in state.params.items()}


def torch_model_with(eff, cfg):
    net = torch_model.TnT(cfg, seed=0).double()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(eff[n])))
    return net


def torch_training(eff, batch, cfg, train, steps=STEPS):
    net = torch_model_with(eff, cfg)
    opt = TnTOptimizer(net, cfg, train)
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    for _ in range(steps):
        loss, _ = torch_model.loss_fn(net, tbatch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().numpy() for n, p in net.named_parameters()}


def max_difference(a, b):
    return max((float(np.abs(np.asarray(a[n]) - np.asarray(b[n])).max()), n) for n in a)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_both_frameworks_train_along_the_reference_trajectory(arch):
    """Adam's defaults (eps 1e-8) and a clip the stored gradients' norm (~0.34 here) exceeds on
    every step: same parameters as the reference loop after STEPS steps."""
    cfg = config(arch)
    train = TrainConfig(max_steps=2 * STEPS, grad_clip=0.25)
    with jax.enable_x64(True):
        eff, batch = initial(cfg, np.random.default_rng(1))
        ref, norms = reference_training({n: jnp.asarray(v) for n, v in eff.items()}, batch, cfg,
                                        train)
        ours_jax = jax_training(eff, batch, cfg, train)
        assert all(v.dtype == np.float64 for v in ours_jax.values())
    ours_torch = torch_training(eff, batch, cfg, train)
    assert min(norms) > train.grad_clip  # the clip acts on every step
    moved = max_difference(ref, eff)
    assert moved[0] > 1e-3, moved
    for ours in (ours_jax, ours_torch):
        assert max_difference(ours, ref)[0] < 1e-10, max_difference(ours, ref)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_gradients_equal_autodiff_through_plain_norms(arch):
    """The graph (embedding fed as is, `unit_norm` in every residual) gives the gradients of the
    design's plain normalizations, in both frameworks; parameters off the sphere's float32
    round-off are renormalized in float64 first, as training keeps them."""
    cfg = config(arch)
    with jax.enable_x64(True):
        eff, batch = initial(cfg, np.random.default_rng(2))
        params = {n: jnp.asarray(v) for n, v in eff.items()}
        jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
        want = jax.jit(jax.grad(lambda p: reference_loss(p, jbatch, cfg)))(params)
        graphdef, _ = jax_model.split_params(jax_model.TnT(cfg, nnx.Rngs(0)))
        got = jax.jit(jax.grad(
            lambda p: jax_model.loss_fn(jax_model.merge_params(graphdef, p), jbatch)[0]))(params)
        assert max_difference(got, want)[0] < 1e-12, max_difference(got, want)
        scale = max(float(jnp.abs(v).max()) for v in want.values())
    net = torch_model_with(eff, cfg)
    torch_model.loss_fn(net, {k: torch.from_numpy(v) for k, v in batch.items()})[0].backward()
    got_torch = {n: p.grad.numpy() for n, p in net.named_parameters()}
    assert max_difference(got_torch, want)[0] < 1e-12, max_difference(got_torch, want)
    embed = "decoder.embed"  # the radial part reaches the embedding rows: they are fed as they are
    rows = np.unique(batch["dec_tokens"])
    radial = np.sum(np.asarray(want[embed])[rows] * eff[embed][rows], axis=-1)
    assert np.abs(radial).max() > 1e-3 * scale


def reference_state(eff, cfg):
    """The state dict the reference's code holds for effective parameters `eff` (decoder-only
    nGPT): its names, `[out, in]` matrices, each scaler stored at `effective / (init/scale)`."""
    scale = cfg.init_scale
    state = {"transformer.wte.weight": eff["decoder.embed"], "lm_head.weight": eff["lm_head"].T,
             "sz": eff["s_z"] * scale}
    for i in range(cfg.n_decoder_layers):
        ours, ref = f"decoder.layers.{i}", f"transformer.h.{i}"
        for theirs, name in (("query", "attn.wq"), ("key", "attn.wk"), ("value", "attn.wv"),
                             ("att_c_proj", "attn.wo"), ("c_fc", "mlp.w_in"),
                             ("mlp_c_proj", "mlp.w_out")):
            state[f"{ref}.{theirs}.weight"] = eff[f"{ours}.{name}"].T
        state[f"{ref}.attn_alpha"] = eff[f"{ours}.attn.alpha"] * (scale / ALPHA_INIT)
        state[f"{ref}.mlp_alpha"] = eff[f"{ours}.mlp.alpha"] * (scale / ALPHA_INIT)
        state[f"{ref}.sqk"] = eff[f"{ours}.attn.s_qk"] * scale
        state[f"{ref}.suv"] = eff[f"{ours}.mlp.s_uv"]
    return {k: np.asarray(v) for k, v in state.items()}


def on_sphere(params, cfg):
    """float64 copies with every projected matrix renormalized (the float32 import rounds them)."""
    specs = param_specs(cfg)
    out = {}
    for n, v in params.items():
        v = np.asarray(v, np.float64)
        if specs[n].project_axis is not None:
            v = v / np.linalg.norm(v, axis=specs[n].project_axis, keepdims=True)
        out[n] = v
    return out


def source_part(params, vocab):
    """The imported parameters without the appended pad id (row, column, s_z entry)."""
    cut = {"decoder.embed": lambda v: v[:vocab], "lm_head": lambda v: v[:, :vocab],
           "s_z": lambda v: v[:vocab]}
    return {n: cut.get(n, lambda v: v)(np.asarray(v)) for n, v in params.items()}


def test_an_imported_reference_model_trains_as_the_reference_loop():
    """A model imported from the reference's weights (V + 1 ids: the pad appended, out of the
    loss's softmax) takes five training steps in both frameworks and lands on the parameters
    the reference's own loop reaches on its V ids (docs/design.md, "Special ids"); the pad's
    row, column and s_z entry stay as imported."""
    src = tiny_config("decoder_only", "ngpt", activation="silu", rope_mode="ngpt_reference")
    V, steps, train = src.vocab_size, 5, TrainConfig(max_steps=20)
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        eff, _ = initial(src, rng)
        imported, cfg = convert_reference(reference_state(eff, src), src.n_heads,
                                          max_len=src.max_len_decoder)
        assert (cfg.vocab_size, cfg.pad_id) == (V + 1, V)
        start = on_sphere(imported, cfg)
        tokens = rng.integers(0, V, size=(4, 9))  # every source id may occur, 0, 1 and 2 too
        batch = {"dec_tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
        ref, _ = reference_training({n: jnp.asarray(v) for n, v in source_part(start, V).items()},
                                    batch, src, train, steps, has_pad=False)
        ours_jax = jax_training(start, batch, cfg, train, steps)
    ours_torch = torch_training(start, batch, cfg, train, steps)
    assert max_difference(ref, source_part(start, V))[0] > 1e-3  # the steps moved the parameters
    for ours in (ours_jax, ours_torch):
        assert max_difference(source_part(ours, V), ref)[0] < 1e-10, max_difference(source_part(ours, V), ref)
        for name, pad_part in (("decoder.embed", lambda v: v[V]), ("lm_head", lambda v: v[:, V]),
                               ("s_z", lambda v: v[V])):
            np.testing.assert_array_equal(pad_part(ours[name]), pad_part(start[name]))
