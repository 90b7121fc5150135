"""The optax chain: unit-norm projection, eigen learning rates, schedule, and learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import random_tokens, tiny_config

from tnt.config import RunConfig, TrainConfig
from tnt.params import param_specs
from tnt.schedule import learning_rate
from tnt_jax.backend import Trainer
from tnt_jax.model import TnT, merge_params, split_params
from tnt_jax.optim import build_optimizer, lr_table, scale_by_eigen_lr, unit_norm_projection
from tnt_jax.train import TrainState, make_train_step


def lr_schedule(cfg, train_cfg):
    """The shared schedule as a plain optax schedule (a lookup in `lr_table`), for references
    built from optax's own transforms."""
    table = jnp.asarray(lr_table(cfg, train_cfg))
    return lambda count: table[jnp.minimum(count, table.shape[0] - 1)]


def batch_for(cfg, rng, B=4, Le=6, Ld=8):
    dec = random_tokens(rng, (B, Ld + 1), cfg.vocab_size)
    batch = {"dec_tokens": dec[:, :-1], "labels": dec[:, 1:]}
    if cfg.has_encoder:
        batch["enc_tokens"] = random_tokens(rng, (B, Le), cfg.vocab_size)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def run_steps(cfg, train_cfg, batch, n, dtype=jnp.float32):
    graphdef, params = split_params(TnT(cfg, nnx.Rngs(0)))
    params = {k: v.astype(dtype) for k, v in params.items()}
    tx = build_optimizer(cfg, train_cfg)
    step = make_train_step(graphdef, tx)
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    params = {k: jnp.array(v, copy=True) for k, v in params.items()}  # the step donates its input
    losses = []
    for _ in range(n):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return graphdef, params, state, losses


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_projection_keeps_matrices_on_the_sphere_and_leaves_scalers(arch, rng):
    cfg = tiny_config(arch, "ngpt")
    _, init, state, _ = run_steps(cfg, TrainConfig(lr=1e-2), batch_for(cfg, rng), 3)
    specs = param_specs(cfg)
    moved_scalers = 0
    for name, spec in specs.items():
        p = np.asarray(state.params[name])
        if spec.project_axis is not None:
            np.testing.assert_allclose(np.linalg.norm(p, axis=spec.project_axis), 1.0, atol=1e-6,
                                       err_msg=name)
        else:  # scalers move freely: never renormalized
            moved_scalers += not np.allclose(p, np.asarray(init[name]))
            assert not np.allclose(np.linalg.norm(p), 1.0) or p.size == 1
    assert moved_scalers > 0


def test_projection_transform_alone_lands_exactly_on_the_sphere(rng):
    params = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "s": jnp.ones(3)}
    updates = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "s": jnp.full(3, 0.5)}
    tx = unit_norm_projection(lambda n: 0 if n == "w" else None)
    out, _ = tx.update(updates, tx.init(params), params)
    new = optax.apply_updates(params, out)
    np.testing.assert_allclose(np.linalg.norm(new["w"], axis=0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["s"]), 1.5)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(updates, tx.init(params))


def test_eigen_lr_reproduces_the_reference_reparametrization(rng):
    """Scalers stored at effective value with TnT's chain (gradients times init/scale before the
    clip and Adam, updates times init/scale after) == the reference's storage (`p / m`,
    multiplied by `m = init/scale` in the forward) with plain clip -> Adam -> lr -> projection,
    over 5 steps, exactly (float64), with Adam's default eps and a clip active on every step.
    (tests/test_reference_training.py also checks the model's graph against the reference.)"""
    cfg = tiny_config("encoder_decoder", "ngpt", n_decoder_layers=1)
    train_cfg = TrainConfig(lr=5e-3, grad_clip=0.1, max_steps=5)
    specs = param_specs(cfg)
    mult = {n: s.eigen_lr for n, s in specs.items()}
    with jax.enable_x64(True):
        batch = batch_for(cfg, rng)
        graphdef, params = split_params(TnT(cfg, nnx.Rngs(0)))
        params = {n: jnp.asarray(v, jnp.float64) for n, v in params.items()}
        tx = build_optimizer(cfg, train_cfg)
        ours = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
        step = make_train_step(graphdef, tx)
        start = {n: jnp.array(v, copy=True) for n, v in params.items()}  # the step donates
        for _ in range(5):
            ours, _ = step(ours, batch)

        def ref_loss(stored):
            from tnt_jax.model import loss_fn

            return loss_fn(merge_params(graphdef, {n: v * mult[n] for n, v in stored.items()}),
                           batch)[0]

        ref_tx = optax.chain(optax.clip_by_global_norm(0.1),
                             optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                             optax.scale_by_learning_rate(lr_schedule(cfg, train_cfg)),
                             unit_norm_projection(lambda n: specs[n].project_axis))
        stored = {n: v / mult[n] for n, v in start.items()}
        opt = ref_tx.init(stored)

        @jax.jit
        def ref_step(stored, opt):
            g = jax.grad(ref_loss)(stored)
            u, opt = ref_tx.update(g, opt, stored)
            return optax.apply_updates(stored, u), opt, optax.global_norm(g)

        for _ in range(5):
            stored, opt, grad_norm = ref_step(stored, opt)
            assert float(grad_norm) > 0.1  # the clip acts
        diffs = sorted((float(jnp.abs(stored[n] * mult[n] - ours.params[n]).max()), n)
                       for n in specs)
        assert diffs[-1][0] < 1e-12, diffs[-4:]
        alpha = "decoder.layers.0.attn.alpha"
        assert float(jnp.abs(ours.params[alpha] - start[alpha]).max()) > 1e-3  # they did move


def test_eigen_lr_transform_scales_each_named_update():
    tx = scale_by_eigen_lr(lambda n: {"a": 2.0, "b": 1.0}[n])
    out, _ = tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, tx.init(None))
    assert out["a"].tolist() == [2.0, 2.0] and out["b"].tolist() == [1.0, 1.0]


def test_schedule_matches_the_shared_formula():
    cfg = tiny_config(norm="rmsnorm")
    t = TrainConfig(max_steps=50, min_lr=1e-5).resolved("rmsnorm")
    sched = lr_schedule(cfg, TrainConfig(max_steps=50, min_lr=1e-5))
    for step in (0, 1, 49, 60, 99, 100, 120):
        want = learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.horizon)
        assert float(sched(step)) == pytest.approx(want, rel=1e-6)
    assert learning_rate(0, 1.0, 0.0, 10, 100) == pytest.approx(0.1)
    assert learning_rate(55, 1.0, 0.0, 10, 100) == pytest.approx(0.5)
    assert learning_rate(500, 1.0, 0.1, 10, 100) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices(rng):
    cfg = tiny_config("decoder_only", "rmsnorm")
    graphdef, params = split_params(TnT(cfg, nnx.Rngs(0)))
    tx = build_optimizer(cfg, TrainConfig(lr=1.0, warmup_steps=0, weight_decay=0.5))
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zero, tx.init(params), params)
    for name, spec in param_specs(cfg).items():
        expect = -0.5 * np.asarray(params[name]) if spec.weight_decay else 0.0
        np.testing.assert_allclose(np.asarray(u[name]), expect, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("norm", ["ngpt", "rmsnorm"])
def test_tiny_model_overfits_a_fixed_batch(norm, rng):
    cfg = tiny_config("encoder_decoder", norm)
    lr = 1e-2 if norm == "ngpt" else 3e-3
    _, _, _, losses = run_steps(cfg, TrainConfig(lr=lr, warmup_steps=0, max_steps=200),
                                batch_for(cfg, rng, B=2), 120)
    assert losses[0] > 3.0 and losses[-1] < 0.3 * losses[0], losses[::20]


def test_optimizer_refuses_parameters_of_another_config():
    cfg = tiny_config("decoder_only", "ngpt")
    params = {n: jnp.zeros(s.shape) for n, s in param_specs(cfg).items()}
    tx = build_optimizer(tiny_config("encoder_decoder", "ngpt"), TrainConfig())
    with pytest.raises(KeyError, match="optimizer parameters do not match the config.*missing: "
                                       "encoder.embed"):
        tx.init(params)
    build_optimizer(cfg, TrainConfig()).init(params)


def test_runs_differing_only_in_lr_share_one_compiled_step(rng):
    """The rates are an input of the Trainer's step: two runs differing only in lr lower to the
    same program (one compilation-cache entry), and the doubled rate doubles the first update."""
    model = tiny_config("decoder_only", "rmsnorm", n_decoder_layers=1)
    a, b = (Trainer(RunConfig(model, TrainConfig(lr=lr, warmup_steps=0, max_steps=4, batch_size=4,
                                                 seq_len=8)))
            for lr in (1e-3, 2e-3))
    dec = random_tokens(rng, (4, 9))
    batch = {"dec_tokens": dec[:, :-1], "labels": dec[:, 1:]}
    programs = [t._train_step.lower(t.state, t._put(batch), t.lr_table).as_text() for t in (a, b)]
    assert programs[0] == programs[1]
    # the same step with the config's table as a constant: one program per rate
    constants = [t._train_step.lower(t.state, t._put(batch)).as_text() for t in (a, b)]
    assert constants[0] != constants[1]
    init = {n: np.asarray(v, np.float64) for n, v in a.state.params.items()}
    np.testing.assert_array_equal(init["decoder.embed"], np.asarray(b.state.params["decoder.embed"]))
    a.step(batch), b.step(batch)
    for name, p in init.items():
        new_a, new_b = (np.asarray(t.state.params[name], np.float64) for t in (a, b))
        # each new weight is p + update rounded to float32: off by at most 2^-24 of itself
        slack = 3 * 2.0 ** -24 * max(np.abs(new_a).max(), np.abs(new_b).max())
        np.testing.assert_allclose(new_b - p, 2 * (new_a - p), rtol=0, atol=slack, err_msg=name)
        assert np.abs(new_a - p).max() > 100 * slack, name  # the step moved every weight
