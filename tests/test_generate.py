"""Generation in both frameworks: KV-cached decoding against full recompute, batches against
single prompts, JAX against torch, the sampling filter, and the prompt policy (tnt/generation.py).

Shapes are shared across tests (same config, prompts and lengths) so JAX compiles each decoder
once per arch/norm.
"""

import warnings

import numpy as np
import pytest
import torch
from flax import nnx
from helpers import ARCH_NORMS, tiny_config

import tnt_jax.generate as jg
import tnt_torch.generate as tg
from tnt.config import ModelConfig
from tnt.generation import (
    PromptTruncated,
    Sampling,
    TokenizerMismatch,
    check_tokenizer,
    filter_logits,
    prepare,
)
from tnt.tokenizer import ByteTokenizer
from tnt_jax.model import TnT as JaxTnT
from tnt_jax.model import to_canonical
from tnt_torch.model import TnT as TorchTnT
from tnt_torch.model import load_canonical

N_NEW = 6
PROMPTS = [np.array([5, 9, 11, 7, 30], np.int32), np.array([12, 4, 8], np.int32)]


def models(arch, norm, **kw):
    """A JAX model and a torch model holding the same canonical parameters."""
    cfg = tiny_config(arch, norm, **kw)
    jm = JaxTnT(cfg, nnx.Rngs(1))
    return jm, load_canonical(TorchTnT(cfg), to_canonical(jm)).eval()


def as_lists(gen):
    return [t.tolist() for t in gen.tokens]


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_cached_decoding_equals_full_recompute(framework, arch, norm):
    jm, tm = models(arch, norm)
    model, gen = (jm, jg) if framework == "jax" else (tm, tg)
    cached = gen.generate(model, PROMPTS, N_NEW, return_logits=True)
    full = gen.generate(model, PROMPTS, N_NEW, use_cache=False, return_logits=True)
    assert as_lists(cached) == as_lists(full)
    for a, b in zip(cached.logits, full.logits, strict=True):
        assert a.shape == b.shape and a.shape[0] >= 1
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_cached_decoding_of_a_bfloat16_model(framework):
    """The cache holds keys and values in the compute dtype: a bfloat16 model decodes with it,
    and its first logits equal the full recompute's within bf16 rounding (a relative step of
    2^-8 at a few rounding points, 4 x 2 x 2^-8 relative to the largest logit)."""
    jm, tm = models("encoder_decoder", "ngpt", dtype="bfloat16")
    model, gen = (jm, jg) if framework == "jax" else (tm, tg)
    cached = gen.generate(model, PROMPTS, N_NEW, return_logits=True, stop_at_eos=False)
    full = gen.generate(model, PROMPTS, N_NEW, use_cache=False, return_logits=True,
                        stop_at_eos=False)
    assert [len(t) for t in cached.tokens] == [N_NEW] * len(PROMPTS)
    for a, b in zip(cached.logits, full.logits, strict=True):
        scale = float(np.abs(b[0]).max())
        np.testing.assert_allclose(a[0], b[0], atol=4 * 2 * 2.0**-8 * scale, rtol=0)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_batch_of_uneven_prompts_equals_one_at_a_time(framework, arch):
    jm, tm = models(arch, "ngpt")
    model, gen = (jm, jg) if framework == "jax" else (tm, tg)
    batched = gen.generate(model, PROMPTS, N_NEW)
    singles = [gen.generate(model, [p], N_NEW).tokens[0].tolist() for p in PROMPTS]
    assert as_lists(batched) == singles


@pytest.mark.parametrize("arch, norm", ARCH_NORMS)
def test_jax_and_torch_give_the_same_greedy_tokens(arch, norm):
    jm, tm = models(arch, norm)
    assert as_lists(jg.generate(jm, PROMPTS, N_NEW)) == as_lists(tg.generate(tm, PROMPTS, N_NEW))


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_sampling_is_seeded_and_the_same_with_and_without_cache(framework):
    jm, tm = models("decoder_only", "ngpt")
    model, gen = (jm, jg) if framework == "jax" else (tm, tg)
    s = Sampling(temperature=1.5, top_k=20, top_p=0.9, seed=3)
    a = gen.generate(model, PROMPTS, N_NEW, s)
    assert as_lists(a) == as_lists(gen.generate(model, PROMPTS, N_NEW, s))
    assert as_lists(a) == as_lists(gen.generate(model, PROMPTS, N_NEW, s, use_cache=False))
    assert all(0 not in t for t in as_lists(a))  # pad is never generated


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.5), (1.0, 1, 1.0), (2.0, 0, 1e-6)])
def test_sampling_filter_is_the_same_in_numpy_jax_and_torch(rng, temperature, top_k, top_p):
    logits = (rng.normal(size=(3, 40)) * 3).astype(np.float32)
    ref = filter_logits(logits, temperature, top_k, top_p, pad_id=0)
    j = np.asarray(jg.filter_logits(logits, temperature, top_k, top_p, 0))
    t = tg.filter_logits(torch.from_numpy(logits), temperature, top_k, top_p, 0).numpy()
    for got in (j, t):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
        np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)
    kept = np.isfinite(ref).sum(-1)
    assert (ref[:, 0] == -np.inf).all() and (kept >= 1).all()
    if top_k:
        assert (kept <= top_k).all()
    if top_p < 1e-3:
        assert (kept == 1).all()


def test_each_row_stops_at_its_eos():
    """With eos := the token row 0 makes first, row 0 is empty and row 1 is cut at that token."""
    jm, tm = models("decoder_only", "ngpt")
    free = as_lists(tg.generate(tm, PROMPTS, N_NEW, stop_at_eos=False))
    eos = free[0][0]
    cfg = tiny_config("decoder_only", "ngpt", eos_id=eos)
    stopping = load_canonical(TorchTnT(cfg), to_canonical(jm)).eval()
    cut = free[1][:free[1].index(eos)] if eos in free[1] else free[1]
    assert as_lists(tg.generate(stopping, PROMPTS, N_NEW)) == [[], cut]
    assert as_lists(tg.generate(stopping, PROMPTS, N_NEW, stop_at_eos=False)) == free


def test_prompt_policy_keeps_the_last_tokens_and_says_so():
    enc_dec, dec = tiny_config("encoder_decoder"), tiny_config("decoder_only")
    long = np.arange(3, 23, dtype=np.int32)  # 20 tokens; the models hold 16
    with pytest.warns(PromptTruncated, match="keeping its last 16"):
        b = prepare(enc_dec, [long], 4)
    assert b.enc_BxS[0].tolist() == long[-16:].tolist()
    assert b.dec_BxP.tolist() == [[enc_dec.bos_id]] and b.n_new == 4
    with pytest.warns(PromptTruncated, match="keeping its last 13"):
        b = prepare(dec, [long], 4)  # 13 prompt tokens + 4 new - 1 = 16 positions
    assert b.dec_BxP[0].tolist() == long[-13:].tolist() and b.fed_len == 16
    with pytest.warns(PromptTruncated, match="making at most 16"):
        assert prepare(enc_dec, [long[:3]], 100, warn=True).n_new == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = prepare(dec, [np.array([], np.int32), long[:3]], 4)
    assert b.dec_BxP.tolist() == [[dec.bos_id, 0, 0], long[:3].tolist()]
    assert b.lengths_B.tolist() == [1, 3]
    with pytest.raises(ValueError, match="outside"):
        prepare(dec, [np.array([3, 99])], 4)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_inference_on_text(framework):
    cfg_kw = dict(vocab_size=259, max_len_encoder=16, max_len_decoder=16)
    jm, tm = models("decoder_only", "ngpt", **cfg_kw)
    model, gen = (jm, jg) if framework == "jax" else (tm, tg)
    tok = ByteTokenizer()
    out = gen.inference(model, tok, "hi", max_length=5)
    assert isinstance(out, str)
    assert gen.inference(model, tok, ["hi", ""], max_length=5) == [out, gen.inference(
        model, tok, "", max_length=5)]
    with pytest.warns(PromptTruncated):
        gen.inference(model, tok, "x" * 40, max_length=5)
    with pytest.raises(TokenizerMismatch, match="vocab_size 259 exceeds the model's 40"):
        gen.inference(models("decoder_only", "ngpt")[1 if framework == "torch" else 0], tok, "hi")


def test_check_tokenizer_names_the_special_ids():
    tok = ByteTokenizer()
    check_tokenizer(tok, tiny_config(vocab_size=300))
    with pytest.raises(TokenizerMismatch, match="eos_id is 2, the model's is 5"):
        check_tokenizer(tok, tiny_config(vocab_size=300, eos_id=5))


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_caches_follow_the_reference_position_transform(arch):
    """rope_mode="ngpt_reference" (imported checkpoints): cached == recompute, JAX == torch."""
    if "rope_mode" not in ModelConfig.__dataclass_fields__:
        pytest.skip("ModelConfig has no rope_mode yet")
    cfg = tiny_config(arch, "ngpt", rope_mode="ngpt_reference")
    jm = JaxTnT(cfg, nnx.Rngs(1))
    tm = load_canonical(TorchTnT(cfg), to_canonical(jm)).eval()
    outs = []
    for model, gen in ((jm, jg), (tm, tg)):
        cached = gen.generate(model, PROMPTS, N_NEW, return_logits=True)
        full = gen.generate(model, PROMPTS, N_NEW, use_cache=False, return_logits=True)
        assert as_lists(cached) == as_lists(full)
        for a, b in zip(cached.logits, full.logits, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        outs.append(as_lists(cached))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("use_cache", [True, False])
def test_torch_fused_weights_live_for_one_request(use_cache):
    """torch decoding computes its fused/scaled weights (w_qkv, w_in * s_uv, lm_head * s_z) once
    per request: nothing stays on the model afterwards, and a weight changed between requests
    through `.data` (which no version counter sees) is used by the next one."""
    from tnt_torch.model import TnT

    cfg = tiny_config("decoder_only", "ngpt")
    prompt = [np.array([5, 6, 7], np.int32)]

    def first_logits(model):
        out = tg.generate(model, prompt, 2, use_cache=use_cache, return_logits=True)
        return out.logits[0][0]

    model = TnT(cfg, seed=0).eval()
    before = first_logits(model)
    assert not any("_decoding_memo" in m.__dict__ for m in model.modules())
    fresh = TnT(cfg, seed=0).eval()
    for m in (model, fresh):
        m.lm_head.data.mul_(0.5)
        m.decoder.layers[0].attn.wq.data.mul_(0.5)
    after = first_logits(model)
    assert not np.allclose(after, before)
    np.testing.assert_array_equal(after, first_logits(fresh))
