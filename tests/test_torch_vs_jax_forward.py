"""tnt_torch against tnt_jax with the same canonical weights: logits, loss, optimizer steps and
greedy decoding agree (float32, padded batches)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import ARCH_NORMS, random_tokens, tiny_config

import tnt_jax.model as jm
import tnt_torch.model as tm
from tnt.config import TrainConfig
from tnt_jax.generate import greedy as jax_greedy
from tnt_jax.optim import build_optimizer as jax_optimizer
from tnt_jax.train import TrainState, make_train_step
from tnt_torch.generate import greedy as torch_greedy
from tnt_torch.optim import TnTOptimizer


def pair(cfg, seed=0):
    jax_model = jm.TnT(cfg, nnx.Rngs(params=seed))
    torch_model = tm.load_canonical(tm.TnT(cfg, seed=seed + 1), jm.to_canonical(jax_model))
    return jax_model, torch_model


def padded_batch(cfg, rng, batch=3, enc_len=12, dec_len=10):
    dec = random_tokens(rng, (batch, dec_len))
    dec[1, 6:] = cfg.pad_id
    out = {"dec_tokens": dec, "labels": np.roll(dec, -1, axis=1)}
    if cfg.has_encoder:
        enc = random_tokens(rng, (batch, enc_len))
        enc[0, 8:] = cfg.pad_id
        enc[2, :] = cfg.pad_id  # a fully padded encoder row: cross-attention sees no key
        out["enc_tokens"] = enc
    return out


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("arch,norm", ARCH_NORMS)
def test_logits_and_loss_match_jax(arch, norm, activation, rng):
    cfg = tiny_config(arch, norm, activation=activation)
    jax_model, torch_model = pair(cfg)
    batch = padded_batch(cfg, rng)
    enc = batch.get("enc_tokens")
    lj = np.asarray(jax_model(None if enc is None else jnp.asarray(enc),
                              jnp.asarray(batch["dec_tokens"])))
    with torch.no_grad():
        lt = torch_model(None if enc is None else torch.from_numpy(enc),
                         torch.from_numpy(batch["dec_tokens"])).numpy()
        loss_t, count_t = tm.loss_fn(torch_model, {k: torch.from_numpy(v)
                                                   for k, v in batch.items()})
    np.testing.assert_allclose(lt, lj, atol=1e-5, rtol=0)
    loss_j, count_j = jm.loss_fn(jax_model, {k: jnp.asarray(v) for k, v in batch.items()})
    assert int(count_t) == int(count_j)
    np.testing.assert_allclose(float(loss_t), float(loss_j), rtol=1e-6)


@pytest.mark.parametrize("norm", ["ngpt", "rmsnorm"])
def test_three_optimizer_steps_match_optax(norm, rng):
    """clip -> Adam -> decay -> eigen LR -> schedule -> projection, against the optax chain
    (encoder_decoder: every kind of matrix and scaler; decoder_only is a subset).

    Adam divides by sqrt(v): an element whose gradient is near zero turns float32 noise into a
    visible difference, hence the tolerance of a few thousandths of one lr-sized update."""
    cfg = tiny_config("encoder_decoder", norm, n_decoder_layers=1)
    train = TrainConfig(max_steps=6, lr=3e-3, warmup_steps=2, grad_clip=0.5,
                        weight_decay=0.1 if norm == "rmsnorm" else None)
    jax_model, torch_model = pair(cfg, seed=4)
    graphdef, params = jm.split_params(jax_model)
    tx = jax_optimizer(cfg, train)
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    step = make_train_step(graphdef, tx)
    opt = TnTOptimizer(torch_model, cfg, train)
    for _ in range(3):
        batch = padded_batch(cfg, rng)
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        loss, _ = tm.loss_fn(torch_model, {k: torch.from_numpy(v) for k, v in batch.items()})
        loss.backward()
        opt.step()
        opt.zero_grad()
        np.testing.assert_allclose(loss.item(), float(metrics["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(opt.last_grad_norm), float(metrics["grad_norm"]),
                                   rtol=1e-5)
    ours = tm.to_canonical(torch_model)
    for name, value in state.params.items():
        np.testing.assert_allclose(ours[name], np.asarray(value), atol=2e-5, err_msg=name)


def test_greedy_decoding_matches_jax(rng):
    cfg = tiny_config("encoder_decoder", "ngpt")
    jax_model, torch_model = pair(cfg, seed=7)
    enc = random_tokens(rng, (9,)) if cfg.has_encoder else None
    prefix = np.array([cfg.bos_id, 5, 6], np.int32)
    a = jax_greedy(jax_model, enc, prefix, 8)
    b = torch_greedy(torch_model, enc, prefix, 8)
    np.testing.assert_array_equal(a, b)
