"""Weights trained with the public nGPT reference code import into TnT and compute, in both
frameworks, what the reference computes (checked against an independent numpy forward of it)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from reference_forward import random_reference_state, reference_logits

import tnt_jax
import tnt_torch
from tnt.reference import convert_reference


@pytest.mark.parametrize("ngpt", [True, False], ids=["ngpt", "baseline"])
def test_imported_reference_weights_give_the_reference_logits(ngpt, tmp_path, report):
    d, heads, vocab = 32, 4, 50
    state = random_reference_state(vocab, d, 2, ngpt)
    idx = np.random.default_rng(1).integers(0, vocab, (2, 10))
    want = reference_logits(state, idx, heads, 1 / math.sqrt(d))
    pt = tmp_path / "ckpt.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()},
                "model_args": {"n_head": heads, "block_size": 16, "base_scale": 1 / math.sqrt(d)}},
               pt)
    params, cfg, path = tnt_torch.import_reference(pt, out=tmp_path / "run")
    assert cfg.rope_mode == "ngpt_reference" and cfg.norm == ("ngpt" if ngpt else "rmsnorm")
    assert cfg.activation == "silu" and cfg.max_len_decoder == 16 and path.name == "0"
    if ngpt:  # effective = stored * init/scale
        np.testing.assert_allclose(params["decoder.layers.0.attn.alpha"],
                                   state["transformer.h.0.attn_alpha"] * 0.05 * math.sqrt(d),
                                   rtol=1e-6)
    jm, _, tok = tnt_jax.load_checkpoint(tmp_path / "run")
    tm, _, _ = tnt_torch.load_checkpoint(tmp_path / "run")
    assert tok is None  # the reference's tokenizer is not TnT's to ship
    got_jax = np.asarray(jm(None, jnp.asarray(idx, jnp.int32)))
    with torch.no_grad():
        got_torch = tm(None, torch.as_tensor(idx)).numpy()
    assert report("logits vs reference (jax)", got_jax, want) <= 1e-5
    assert report("logits vs reference (torch)", got_torch, want) <= 1e-5


def test_rotate_mode_differs_and_bad_dicts_are_named():
    state = random_reference_state(40, 32, 1, True)
    rotate, cfg = convert_reference(state, 4, rope_mode="rotate")
    idx = jnp.asarray(np.arange(3, 11)[None], jnp.int32)
    a = tnt_jax.load_canonical(tnt_jax.TnT(cfg, nnx.Rngs(0)), rotate)
    want = reference_logits(state, np.asarray(idx), 4, 1 / math.sqrt(32))
    assert np.abs(np.asarray(a(None, idx)) - want).max() > 1e-3  # the two transforms differ
    with pytest.raises(KeyError, match="lacks transformer.h.0.sqk"):
        convert_reference({k: v for k, v in state.items() if not k.endswith("sqk")}, 4)
    with pytest.raises(KeyError, match="names TnT does not know: transformer.h.0.bias"):
        convert_reference({**state, "transformer.h.0.bias": np.zeros(3)}, 4)
    with pytest.raises(KeyError, match="no transformer.wte.weight"):
        convert_reference({"weight": np.zeros(3)}, 4)
