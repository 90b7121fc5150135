"""Forward parity: the same canonical weights give the same logits, loss and encoder output."""

import numpy as np
import pytest
import torch

import tnt_jax
import tnt_torch
from experiments.parity import (
    CASES,
    config,
    jax_batch,
    jax_device,
    models,
    padded_batch,
    torch_batch,
    torch_device,
)


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


@pytest.mark.parametrize("rope_mode", ["rotate", "ngpt_reference"])
def test_rope_tables_are_built_once_and_transform_alike(rope_mode, device, report):
    """Both mirrors read one set of tables per length (`tnt.rope.position_tables`, read-only);
    torch keeps its device copy per (length, device), JAX makes them jit constants; the two
    transforms agree."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from tnt.rope import position_tables

    cfg = dataclasses.replace(config("decoder_only", "ngpt"), rope_mode=rope_mode)
    L = 7
    tables = position_tables(rope_mode, L, cfg.head_dim, cfg.rope_base)
    assert tables is position_tables(rope_mode, L, cfg.head_dim, cfg.rope_base)
    assert not any(t.flags.writeable for t in tables)
    _, tm, _ = models(cfg, device)
    tdev = torch_device(device)
    rope = tm.rope(L, tdev)
    assert tm.rope(L, tdev) is rope and tm.rope(L + 1, tdev) is not rope
    x = np.random.default_rng(0).standard_normal((2, L, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    t_out = rope.apply(torch.as_tensor(x, device=tdev)).cpu().numpy()
    with jax.default_device(jax_device(device)):
        j_out = np.asarray(tnt_jax.model.RoPE(cfg, L).apply(jnp.asarray(x)))
    assert np.abs(t_out).max() > 0.1  # not a zero transform
    # at most two products and a sum, each rounded, of values no larger than 2 max|x|
    assert report(f"RoPE {rope_mode}", j_out, t_out) <= 6 * np.finfo(np.float32).eps * np.abs(x).max()
