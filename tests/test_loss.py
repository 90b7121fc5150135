"""The loss is the cross-entropy over the real tokens: the pad column is no part of the softmax
(docs/design.md, "Special ids"), in both frameworks, with zero gradient to the pad's lm_head
column and s_z entry. Checked in float64 against the column removed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import ARCH_NORMS, random_tokens, tiny_config

from tnt_jax import model as jax_model
from tnt_torch import model as torch_model


def by_hand(logits_BxLxV: np.ndarray, labels_BxL: np.ndarray, pad: int) -> float:
    """Mean float64 cross-entropy over the non-pad labels with the pad column deleted."""
    z = np.delete(np.asarray(logits_BxLxV, np.float64), pad, axis=-1)
    ids = np.where(labels_BxL > pad, labels_BxL - 1, labels_BxL)  # ids after the deleted column
    logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll = logz - np.take_along_axis(z, ids[..., None], -1)[..., 0]
    valid = labels_BxL != pad
    return float(nll[valid].sum() / valid.sum())


def batch(cfg, rng):
    """Labels hold real ids on both sides of the pad and some pad (ignored) positions."""
    dec = random_tokens(rng, (3, 7), cfg.vocab_size)
    labels = random_tokens(rng, (3, 7), cfg.vocab_size)
    labels[0, -2:] = cfg.pad_id
    labels[1, 0] = 0 if cfg.pad_id else cfg.vocab_size - 1
    out = {"dec_tokens": dec, "labels": labels}
    if cfg.has_encoder:
        out["enc_tokens"] = random_tokens(rng, (3, 5), cfg.vocab_size)
    return out


@pytest.mark.parametrize("pad_id", [0, 17], ids=["pad0", "pad17"])
@pytest.mark.parametrize("arch,norm", ARCH_NORMS)
def test_loss_is_the_cross_entropy_without_the_pad_column(arch, norm, pad_id, rng):
    cfg = tiny_config(arch, norm, pad_id=pad_id)
    b = batch(cfg, rng)
    if pad_id:  # ids 0..2 are real tokens here; a token stream of them is fine
        b["dec_tokens"][0, 0] = 0
    with jax.enable_x64(True):
        jm = jax_model.TnT(cfg, nnx.Rngs(0))
        graphdef, params = jax_model.split_params(jm)
        params = {n: jnp.asarray(v, jnp.float64) for n, v in params.items()}
        jb = {k: jnp.asarray(v) for k, v in b.items()}
        logits = np.asarray(jax_model.merge_params(graphdef, params)(jb.get("enc_tokens"), jb["dec_tokens"]))
        want = by_hand(logits, b["labels"], pad_id)
        (loss, count), grads = jax.value_and_grad(
            lambda p: jax_model.loss_fn(jax_model.merge_params(graphdef, p), jb), has_aux=True)(params)
        assert abs(float(loss) - want) < 1e-12 * max(1.0, want)
        assert int(count) == int((b["labels"] != pad_id).sum())
        jax_grads = {n: np.asarray(g) for n, g in grads.items()}
    net = torch_model.TnT(cfg, seed=0).double()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.from_numpy(np.array(params[n], np.float64)))
    tb = {k: torch.from_numpy(v) for k, v in b.items()}
    tloss, tcount = torch_model.loss_fn(net, tb)
    assert abs(float(tloss.detach()) - want) < 1e-12 * max(1.0, want) and int(tcount) == int(count)
    tloss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in net.named_parameters()}
    for grads in (jax_grads, torch_grads):
        assert all(np.isfinite(g).all() for g in grads.values())
        assert not grads["lm_head"][:, pad_id].any()
        assert np.abs(np.delete(grads["lm_head"], pad_id, axis=1)).max() > 0
        if norm == "ngpt":
            assert grads["s_z"][pad_id] == 0 and np.abs(grads["s_z"]).max() > 0
    for n in jax_grads:
        np.testing.assert_allclose(torch_grads[n], jax_grads[n], atol=1e-12, err_msg=n)


def test_the_pad_logit_cannot_change_the_loss(rng):
    """Raising the pad's logit (its s_z entry) changes the model's logits but not its loss."""
    cfg = tiny_config("decoder_only", "ngpt")
    b = {k: torch.from_numpy(v) for k, v in batch(cfg, rng).items()}
    net = torch_model.TnT(cfg, seed=0).double()
    before = float(torch_model.loss_fn(net, b)[0].detach())
    with torch.no_grad():
        net.s_z[cfg.pad_id] += 50.0
    assert float(torch_model.loss_fn(net, b)[0].detach()) == pytest.approx(before, rel=1e-12)
