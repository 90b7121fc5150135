"""Forward parity: the same canonical weights give the same logits, loss and encoder output."""

import numpy as np
import pytest
import torch

import tnt_jax
import tnt_torch
from experiments.parity import CASES, config, jax_batch, models, padded_batch, torch_batch


@pytest.mark.parametrize("arch, norm, activation", CASES)
def test_logits_and_loss_match(arch, norm, activation, device, tol, report):
    cfg = config(arch, norm, activation)
    jm, tm, _ = models(cfg, device)
    batch = padded_batch(cfg)
    jb, tb = jax_batch(batch, device), torch_batch(batch, device)
    j_logits = np.asarray(jm(jb.get("enc_tokens"), jb["dec_tokens"]))
    with torch.no_grad():
        t_logits = tm(tb.get("enc_tokens"), tb["dec_tokens"]).cpu().numpy()
        t_loss = float(tnt_torch.loss_fn(tm, tb)[0])
    j_loss = float(tnt_jax.loss_fn(jm, jb)[0])
    assert np.isfinite(j_logits).all() and np.isfinite(t_logits).all()
    assert report("logits", j_logits, t_logits) <= tol["logits"]
    assert report("loss", j_loss, t_loss) <= tol["loss"]
    if cfg.has_encoder:
        j_enc = np.asarray(jm.encode(jb["enc_tokens"]))
        with torch.no_grad():
            t_enc = tm.encode(tb["enc_tokens"]).cpu().numpy()
        assert report("encoder output", j_enc, t_enc) <= tol["logits"]


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_weights_roundtrip_between_frameworks_exactly(arch, device, report):
    cfg = config(arch, "ngpt")
    _, tm, weights = models(cfg, device)
    back = tnt_torch.to_canonical(tm)
    assert set(back) == set(weights)
    worst = max(float(np.abs(back[n] - weights[n]).max()) for n in weights)
    assert report("weights, all names", worst, 0.0) == 0.0
