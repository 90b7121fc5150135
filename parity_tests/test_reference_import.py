"""Weights trained with the public nGPT reference code import into TnT and compute, in both
frameworks, what the reference computes (checked against an independent numpy forward of it)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from reference_forward import random_reference_state, reference_logits

import tnt_jax
import tnt_torch
from experiments.analyze import analyze
from tnt.checkpoint_io import read_canonical
from tnt.generation import Sampling
from tnt.reference import convert_reference
from tnt_jax.generate import generate as jax_generate
from tnt_torch.generate import generate as torch_generate


def _save_reference(tmp_path, state, d, heads, block_size=32, **args):
    """The `.pt` file the reference's train.py writes."""
    pt = tmp_path / "ckpt.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()},
                "model_args": {"n_head": heads, "block_size": block_size,
                               "base_scale": 1 / math.sqrt(d), **args}}, pt)
    return pt


@pytest.mark.parametrize("ngpt", [True, False], ids=["ngpt", "baseline"])
def test_imported_reference_weights_give_the_reference_logits(ngpt, tmp_path, report):
    """Every source id, 0, 1, 2 and the last included, is a real token: the logits over the
    source vocabulary are the reference's, and the appended pad id's logit is 0."""
    d, heads, vocab = 32, 4, 50
    state = random_reference_state(vocab, d, 2, ngpt)
    idx = np.random.default_rng(1).permutation(vocab).reshape(2, 25)  # each id exactly once
    want = reference_logits(state, idx, heads, 1 / math.sqrt(d))
    params, cfg, path = tnt_torch.import_reference(_save_reference(tmp_path, state, d, heads),
                                                   out=tmp_path / "run")
    assert cfg.rope_mode == "ngpt_reference" and cfg.norm == ("ngpt" if ngpt else "rmsnorm")
    assert cfg.activation == "silu" and cfg.max_len_decoder == 32 and path.name == "0"
    assert (cfg.vocab_size, cfg.pad_id, cfg.bos_id, cfg.eos_id) == (vocab + 1, vocab, None, None)
    special = read_canonical(tmp_path / "run")[1]["special_ids"]
    assert special["pad_id"] == {"id": vocab, "from": f"appended row {vocab}: no source id is "
                                                      "padding"}
    assert special["eos_id"]["id"] is None and special["eos_id"]["from"].startswith("none")
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
    assert report("logits vs reference (jax)", got_jax[..., :vocab], want) <= 1e-5
    assert report("logits vs reference (torch)", got_torch[..., :vocab], want) <= 1e-5
    assert not got_jax[..., vocab].any() and not got_torch[..., vocab].any()


def _imported(tmp_path, vocab=50, **kw):
    """A JAX and a torch model imported from one random reference checkpoint (nGPT)."""
    d, heads = 32, 4
    tmp_path.mkdir(exist_ok=True)
    state = random_reference_state(vocab, d, 1, True)
    if kw.pop("uniform", False):
        state["sz"] = np.zeros_like(state["sz"])  # every logit 0: a uniform next-token choice
    tnt_torch.import_reference(_save_reference(tmp_path, state, d, heads, block_size=128),
                               out=tmp_path / "run", **kw)
    return tnt_jax.load_checkpoint(tmp_path / "run")[0], tnt_torch.load_checkpoint(tmp_path / "run")[0]


def test_generation_from_an_imported_model_can_emit_id_0_and_does_not_stop_at_id_2(tmp_path):
    """A uniform model over 8 source ids (each missed by 60 draws with chance (7/8)^60 < 1e-3):
    0 comes out, 2 does not end the text, the pad id 8 never appears. With eos given (5), the
    same draws end before the first 5."""
    n, prompt = 60, [np.array([0, 1, 2, 7])]
    models = _imported(tmp_path, vocab=8, uniform=True)
    for model, generate in zip(models, (jax_generate, torch_generate), strict=True):
        toks = generate(model, prompt, n, Sampling(1.0, seed=3)).tokens[0].tolist()
        assert len(toks) == n and 0 in toks and 2 in toks[:-1] and 5 in toks and 8 not in toks
    stopping = _imported(tmp_path / "eos", vocab=8, uniform=True, eos_id=5)
    for model, generate in zip(stopping, (jax_generate, torch_generate), strict=True):
        free = generate(model, prompt, n, Sampling(1.0, seed=3), stop_at_eos=False)
        cut = generate(model, prompt, n, Sampling(1.0, seed=3)).tokens[0].tolist()
        assert cut == free.tokens[0].tolist()[:free.tokens[0].tolist().index(5)]


def test_batched_prompts_of_an_imported_model_match_one_at_a_time(tmp_path):
    prompts = [np.array([0, 1, 2, 49, 0]), np.array([2]), np.array([49, 0, 0, 1, 2, 3, 4, 5, 6])]
    jm, tm = _imported(tmp_path)
    for model, generate in ((jm, jax_generate), (tm, torch_generate)):
        batched = [t.tolist() for t in generate(model, prompts, 12).tokens]
        alone = [generate(model, [p], 12).tokens[0].tolist() for p in prompts]
        assert batched == alone and all(len(t) == 12 for t in batched)  # eos None: no stop


def test_rotate_mode_differs_and_bad_dicts_are_named():
    state = random_reference_state(40, 32, 1, True)
    rotate, cfg = convert_reference(state, 4, rope_mode="rotate")
    idx = jnp.asarray(np.arange(3, 11)[None], jnp.int32)
    a = tnt_jax.load_canonical(tnt_jax.TnT(cfg, nnx.Rngs(0)), rotate)
    want = reference_logits(state, np.asarray(idx), 4, 1 / math.sqrt(32))
    assert np.abs(np.asarray(a(None, idx))[..., :40] - want).max() > 1e-3  # the two transforms differ
    with pytest.raises(KeyError, match="lacks transformer.h.0.sqk"):
        convert_reference({k: v for k, v in state.items() if not k.endswith("sqk")}, 4)
    with pytest.raises(KeyError, match="names TnT does not know: transformer.h.0.bias"):
        convert_reference({**state, "transformer.h.0.bias": np.zeros(3)}, 4)
    with pytest.raises(KeyError, match="no transformer.wte.weight"):
        convert_reference({"weight": np.zeros(3)}, 4)


def test_analysis_of_an_imported_model_sees_the_source_tokens_only(tmp_path):
    """experiments.analyze leaves the appended pad out: its embedding numbers are the source's."""
    state = random_reference_state(50, 32, 1, False)
    tnt_torch.import_reference(_save_reference(tmp_path, state, 32, 4), out=tmp_path / "run")
    numbers = json.loads((analyze(tmp_path / "run").parent / "numbers.json").read_text())["numbers"]
    for ours, theirs in (("lm_head", "lm_head.weight"), ("decoder.embed", "transformer.wte.weight")):
        norms = np.linalg.norm(state[theirs].astype(np.float64), axis=1)
        assert numbers[f"{ours} norm_mean"] == pytest.approx(norms.mean(), rel=1e-5)
        assert numbers[f"{ours} norm_std"] == pytest.approx(norms.std(), rel=1e-4)
