"""Text generation: `inference(model, tokenizer, text)`, KV-cached and compiled, and the
full-recompute reference it is checked against.

Policy (prompts, truncation, padding, sampling rules) is `tnt.generation`'s, shared with
`tnt_torch.generate`. Here:

- `generate(..., use_cache=True)`: one `jax.jit` call per request. The encoder runs once, each
  layer's cross-attention keys and values are computed once, and the decoder keeps a
  fixed-size self-attention KV cache `[B, cache_len, H, dh]` per layer. The prompt is prefilled
  in one pass; the new tokens are made in a `lax.while_loop` that stops when every row has
  reached eos. Cached keys are stored as attention uses them: rotated at their own position (or,
  for `rope_mode="ngpt_reference"`, transformed as the reference code does) and, for ngpt,
  normalized and scaled by `s_qk`.
- `generate(..., use_cache=False)`: the seed's method, the whole model (encoder and decoder) run
  again for every new token on a fixed-size buffer; the reference for tests and the baseline of
  `python -m experiments.bench generate`.
- `greedy`: the single-prompt greedy loop used for the end-of-run sample of `experiments.pretrain`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnt.data import check_token_ids
from tnt.generation import (
    GREEDY,
    Batch,
    Generation,
    Sampling,
    check_inference_args,
    collect,
    prepare,
    run_inference,
)
from tnt_jax.model import TnT, attend, l2norm, merge_params, split_params

BUCKET = 16  # prompt lengths are padded to a multiple of this: fewer shapes to compile


@nnx.jit
def _next_token(model: TnT, enc_tokens, enc_out, buf, pos):
    logits = model.decode(buf, enc_out, enc_tokens) if enc_out is not None else model.decode(buf)
    return jnp.argmax(logits[0, pos], axis=-1).astype(jnp.int32)


def greedy(model: TnT, enc_tokens: np.ndarray | None, prefix: np.ndarray, n: int) -> np.ndarray:
    """Continue `prefix` (decoder tokens, 1-D) by `n` greedy tokens, stopping at eos."""
    cfg = model.cfg
    prefix = np.asarray(prefix, np.int32)
    length = min(len(prefix) + n, cfg.max_len_decoder)
    if len(prefix) == 0 or len(prefix) >= length:
        raise ValueError(f"prefix of length {len(prefix)} leaves no room to decode up to "
                         f"max_len_decoder={cfg.max_len_decoder}")
    check_token_ids(prefix, cfg.vocab_size, "prefix")
    enc, enc_out = None, None
    if cfg.has_encoder:
        enc = jnp.asarray(np.asarray(enc_tokens, np.int32)[None])
        enc_out = model.encode(enc)
    buf = np.full((1, length), cfg.pad_id, np.int32)
    buf[0, :len(prefix)] = prefix
    buf = jnp.asarray(buf)
    out = []
    for pos in range(len(prefix) - 1, length - 1):
        tok = _next_token(model, enc, enc_out, buf, jnp.int32(pos))
        t = int(tok)
        out.append(t)
        if t == cfg.eos_id:
            break
        buf = buf.at[0, pos + 1].set(tok)
    return np.asarray(out, np.int32)


# --- sampling (tnt.generation.filter_logits is the numpy reference) -----------------------------

def filter_logits(logits_BxV: jax.Array, temperature, top_k, top_p, pad_id: int) -> jax.Array:
    """`logits / temperature` with pad, and everything outside top-k and top-p, set to -inf."""
    z = jnp.asarray(logits_BxV, jnp.float32) / temperature
    z = z.at[:, pad_id].set(-jnp.inf)
    s = -jnp.sort(-z, axis=-1)
    rank = jnp.broadcast_to(jnp.arange(z.shape[-1]), z.shape)
    keep = jnp.where(top_k > 0, rank < top_k, True)
    p = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)
    keep = keep & jnp.where(top_p < 1, (jnp.cumsum(p, axis=-1) - p) < top_p, True)
    n_keep = jnp.sum(keep, axis=-1)
    thresh = jnp.take_along_axis(s, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(z >= thresh, z, -jnp.inf)


def _choose(logits_BxV, knobs, key, pad_id: int, greedy: bool) -> jax.Array:
    """The next token per row: argmax (greedy) or a draw from the filtered distribution."""
    if greedy:
        return jnp.argmax(logits_BxV.at[:, pad_id].set(-jnp.inf), axis=-1).astype(jnp.int32)
    temperature, top_k, top_p = knobs
    z = filter_logits(logits_BxV, temperature, top_k, top_p, pad_id)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


_choose_jit = jax.jit(_choose, static_argnums=(3, 4))


def _knobs(sampling: Sampling):
    return (jnp.float32(max(sampling.temperature, 1e-30)), jnp.int32(sampling.top_k),
            jnp.float32(sampling.top_p))


# --- the cached decoder: the model's own layers, with attention reading and writing caches ------

def _rope_rows(x_BxTxHxK, cos_BxTxK2, sin_BxTxK2) -> jax.Array:
    """`apply_rope` at per-row positions (the same arithmetic)."""
    x1, x2 = jnp.split(x_BxTxHxK, 2, axis=-1)
    cos, sin = cos_BxTxK2[:, :, None, :], sin_BxTxK2[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _reference_rows(x_BxTxHxK, table_BxTxK) -> jax.Array:
    """`apply_reference_rope` (rope_mode="ngpt_reference") at per-row positions."""
    pairs = x_BxTxHxK.reshape(*x_BxTxHxK.shape[:-1], -1, 2)[..., ::-1]
    return pairs.reshape(x_BxTxHxK.shape) * table_BxTxK[:, :, None, :]


def _position(x_BxTxHxK, cols_BxT, rope) -> jax.Array:
    """The model's position transform (`TnT.rope`'s tables) at each row's own positions."""
    cos, sin = rope
    if cos is None:  # rope_mode="ngpt_reference": `sin` holds the reference's table
        return _reference_rows(x_BxTxHxK, sin[cols_BxT])
    return _rope_rows(x_BxTxHxK, cos[cols_BxT], sin[cols_BxT])


def _heads(attn, x_BxTxD) -> jax.Array:
    return x_BxTxD.reshape(*x_BxTxD.shape[:2], attn.n_heads, attn.head_dim)


def _qk_norm(attn, t_BxTxHxK) -> jax.Array:
    """ngpt: `s_qk * norm_dh(t)` (docs/design.md); rmsnorm: unchanged."""
    if attn.ngpt:
        return attn.s_qk[...].reshape(attn.n_heads, attn.head_dim) * l2norm(t_BxTxHxK)
    return t_BxTxHxK


def _scale(attn) -> float:
    return math.sqrt(attn.head_dim) if attn.ngpt else 1.0 / math.sqrt(attn.head_dim)


def _self_attention(attn, x_BxTxD, cols_BxT, rope, cache, prefill: bool):
    """Self-attention of new tokens at positions `cols_BxT`; returns (output, updated cache).

    Prefill (all rows from position 0) attends causally among the T prompt tokens and writes
    them to cache columns [0, T); a decode step (T = 1) writes each row's key and value at its
    own position and attends to that row's cache up to it.
    """
    B, T, D = x_BxTxD.shape
    q = _qk_norm(attn, _position(_heads(attn, x_BxTxD @ attn.wq[...]), cols_BxT, rope))
    k = _qk_norm(attn, _position(_heads(attn, x_BxTxD @ attn.wk[...]), cols_BxT, rope))
    v = _heads(attn, x_BxTxD @ attn.wv[...])
    k_cache, v_cache = cache
    if prefill:
        k_cache, v_cache = k_cache.at[:, :T].set(k), v_cache.at[:, :T].set(v)
        mask_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
        y = attend(q, k, v, mask_BxTxT, _scale(attn))
    else:
        rows = jnp.arange(B)
        k_cache = k_cache.at[rows, cols_BxT[:, 0]].set(k[:, 0])
        v_cache = v_cache.at[rows, cols_BxT[:, 0]].set(v[:, 0])
        mask_BxTxS = jnp.arange(k_cache.shape[1])[None, None, :] <= cols_BxT[:, :, None]
        y = attend(q, k_cache, v_cache, mask_BxTxS, _scale(attn))
    return y.reshape(B, T, D) @ attn.wo[...], (k_cache, v_cache)


def _cross_kv(attn, enc_BxSxD) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys (normalized and scaled for ngpt) and values, once per request."""
    return _qk_norm(attn, _heads(attn, enc_BxSxD @ attn.wk[...])), _heads(attn, enc_BxSxD @ attn.wv[...])


def _cross_attention(attn, x_BxTxD, kv, enc_valid_BxS) -> jax.Array:
    B, T, D = x_BxTxD.shape
    q = _qk_norm(attn, _heads(attn, x_BxTxD @ attn.wq[...]))
    mask_BxTxS = jnp.broadcast_to(enc_valid_BxS[:, None, :], (B, T, enc_valid_BxS.shape[1]))
    y = attend(q, kv[0], kv[1], mask_BxTxS, _scale(attn))
    return y.reshape(B, T, D) @ attn.wo[...]


def _decoder(model: TnT, tokens_BxT, cols_BxT, rope, caches, cross, enc_valid_BxS,
             prefill: bool):
    """The decoder stack (as `Stack.__call__`) on new tokens; returns (h [B, T, D], caches)."""
    dec = model.decoder
    h = jnp.take(dec.embed[...], tokens_BxT, axis=0)
    if dec.final_norm is None:
        h = l2norm(h)
    new_caches = []
    for i, layer in enumerate(dec.layers):
        written = []

        def self_attn(x, layer=layer, i=i, written=written):
            y, cache = _self_attention(layer.attn, x, cols_BxT, rope, caches[i], prefill)
            written.append(cache)
            return y

        h = layer._residual(h, "attn", self_attn)
        new_caches.append(written[0])
        if layer.cross is not None:
            h = layer._residual(h, "cross", lambda x, layer=layer, i=i: _cross_attention(
                layer.cross, x, cross[i], enc_valid_BxS))
        h = layer._residual(h, "mlp", layer.mlp)
    return (h if dec.final_norm is None else dec.final_norm(h)), new_caches


def _logits(model: TnT, h_BxD) -> jax.Array:
    logits = (h_BxD @ model.lm_head[...]).astype(jnp.float32)
    return logits * model.s_z[...] if model.cfg.norm == "ngpt" else logits


@partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 10))
def _generate_cached(graphdef, params, enc_BxS, dec_BxP, lengths_B, knobs, n_new: int,
                     cache_len: int, greedy: bool, want_logits: bool, stop_at_eos: bool, key):
    model = merge_params(graphdef, params)
    cfg = model.cfg
    B, P = dec_BxP.shape
    rope = model.rope(cache_len)
    cross, enc_valid = None, None
    if enc_BxS is not None:
        enc_out = model.encode(enc_BxS)
        cross = [_cross_kv(layer.cross, enc_out) for layer in model.decoder.layers]
        enc_valid = enc_BxS != cfg.pad_id
    zeros = jnp.zeros((B, cache_len, cfg.n_heads, cfg.head_dim), jnp.float32)
    caches = [(zeros, zeros) for _ in model.decoder.layers]
    cols = jnp.broadcast_to(jnp.arange(P)[None], (B, P))
    h, caches = _decoder(model, dec_BxP, cols, rope, caches, cross, enc_valid, prefill=True)
    logits = _logits(model, h[jnp.arange(B), lengths_B - 1])
    tok = _choose(logits, knobs, jax.random.fold_in(key, 0), cfg.pad_id, greedy)
    out = jnp.full((B, n_new), cfg.pad_id, jnp.int32).at[:, 0].set(tok)
    done = (tok == cfg.eos_id) & stop_at_eos
    lbuf = (jnp.zeros((B, n_new, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
            if want_logits else None)

    def cond(carry):
        t, _, _, done, _, _ = carry
        return (t < n_new) & ~jnp.all(done)

    def body(carry):
        t, tok, out, done, caches, lbuf = carry
        cols = (lengths_B + t - 1)[:, None]
        h, caches = _decoder(model, tok[:, None], cols, rope, caches, cross, enc_valid,
                             prefill=False)
        logits = _logits(model, h[:, 0])
        new = _choose(logits, knobs, jax.random.fold_in(key, t), cfg.pad_id, greedy)
        new = jnp.where(done, cfg.pad_id, new)
        if lbuf is not None:
            lbuf = lbuf.at[:, t].set(logits)
        done = done | ((new == cfg.eos_id) & stop_at_eos)
        return t + 1, new, out.at[:, t].set(new), done, caches, lbuf

    carry = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, done, caches, lbuf))
    return carry[2], carry[5]


@partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, enc_BxS, buf_BxL, pos_B) -> jax.Array:
    """Everything recomputed (encoder and decoder); the logits at each row's position."""
    logits = merge_params(graphdef, params)(enc_BxS, buf_BxL)
    return logits[jnp.arange(buf_BxL.shape[0]), pos_B]


def _generate_uncached(graphdef, params, batch: Batch, knobs, greedy: bool, key, pad: int,
                       eos: int | None):
    B, n = len(batch.lengths_B), batch.n_new
    lengths = batch.lengths_B
    buf = np.full((B, batch.fed_len), pad, np.int32)
    width = min(batch.dec_BxP.shape[1], batch.fed_len)
    buf[:, :width] = batch.dec_BxP[:, :width]
    enc = None if batch.enc_BxS is None else jnp.asarray(batch.enc_BxS)
    out = np.full((B, n), pad, np.int32)
    logits_all = []
    done = np.zeros(B, bool)
    for t in range(n):
        pos = lengths - 1 + t
        logits = _full_logits(graphdef, params, enc, jnp.asarray(buf), jnp.asarray(pos))
        tok = np.asarray(_choose_jit(logits, knobs, jax.random.fold_in(key, t), pad, greedy))
        tok = np.where(done, pad, tok)
        out[:, t] = tok
        logits_all.append(np.asarray(logits))
        done |= (tok == eos) if eos is not None else False
        if done.all():
            break
        if t < n - 1:
            buf[np.arange(B), pos + 1] = tok
    logits_BxNxV = np.zeros((B, n, logits_all[0].shape[-1]), np.float32)
    logits_BxNxV[:, :len(logits_all)] = np.stack(logits_all, 1)
    return out, logits_BxNxV


def generate(model: TnT, prompts: list[np.ndarray], max_new_tokens: int,
             sampling: Sampling = GREEDY, *, use_cache: bool = True,
             return_logits: bool = False, bucket: int = BUCKET, warn: bool = True,
             stop_at_eos: bool = True) -> Generation:
    """Decode a batch of token-id prompts (encoder inputs for encoder_decoder, prefixes for
    decoder_only) by up to `max_new_tokens` each; see `tnt.generation` for the policy.
    `stop_at_eos=False` makes exactly `max_new_tokens` (benchmarks)."""
    cfg = model.cfg
    batch = prepare(cfg, prompts, max_new_tokens, bucket if use_cache else 1, warn)
    graphdef, params = split_params(model)
    knobs, key = _knobs(sampling), jax.random.key(sampling.seed)
    if use_cache:
        enc = None if batch.enc_BxS is None else jnp.asarray(batch.enc_BxS)
        out, logits = _generate_cached(graphdef, params, enc, jnp.asarray(batch.dec_BxP),
                                       jnp.asarray(batch.lengths_B), knobs, batch.n_new,
                                       batch.cache_len, sampling.greedy, return_logits,
                                       stop_at_eos, key)
    else:
        out, logits = _generate_uncached(graphdef, params, batch, knobs, sampling.greedy, key,
                                         cfg.pad_id, cfg.eos_id if stop_at_eos else None)
    return collect(batch, np.asarray(out), None if not return_logits else np.asarray(logits),
                   cfg.eos_id if stop_at_eos else None)


def inference(model: TnT, tokenizer, input_text: str | list[str], max_length: int = 128, *,
              temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
              use_cache: bool = True) -> str | list[str]:
    """Generate text: `output = inference(model, tokenizer, input_text, max_length=128)`.

    Greedy by default; `temperature > 0` samples (with `top_k`, `top_p`, `seed`). A list of
    prompts decodes as one batch and returns a list. encoder_decoder: the prompt goes to the
    encoder and the answer starts from the start token. decoder_only: the answer continues the
    prompt (an empty prompt starts from the start token). `max_length` is the number of new
    tokens, at most `max_len_decoder`. A prompt too long for the model keeps its last tokens and
    a `tnt.generation.PromptTruncated` warning says so. Decoding stops at eos. A tokenizer whose
    vocabulary or special ids do not fit the model raises `TokenizerMismatch`; other bad
    arguments raise TypeError/ValueError naming them, before anything runs.
    """
    check_inference_args(model, tokenizer, input_text, max_length, seed)
    return run_inference(partial(generate, model, use_cache=use_cache), model.cfg, tokenizer,
                         input_text, max_length,
                         Sampling(temperature, top_k, top_p, seed))
