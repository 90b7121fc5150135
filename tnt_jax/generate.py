"""Text generation: `inference(model, tokenizer, text)`, KV-cached and compiled, and the
full-recompute reference it is checked against.

Policy (prompts, truncation, padding, sampling rules) is `tnt.generation`'s, shared with
`tnt_torch.generate`. Here:

- `generate(..., use_cache=True)`: one `jax.jit` call per request. `TnT.start_cache` runs the
  encoder once and computes each layer's cross-attention keys and values once; the model's own
  `TnT.extend` prefills the prompt in one pass and then makes the new tokens, one per row and
  step, in a `lax.while_loop` that stops when every row has reached eos.
- `generate(..., use_cache=False)`: no cache, the whole model (encoder and decoder) run
  again for every new token on a fixed-size buffer; the reference for tests and the baseline of
  `python -m experiments.bench generate`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

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
from tnt_jax.model import TnT, merge_params, split_params

BUCKET = 16  # prompt lengths are padded to a multiple of this: fewer shapes to compile


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


def _at_eos(tok_B: jax.Array, eos: int | None) -> jax.Array:
    return tok_B == eos if eos is not None else jnp.zeros_like(tok_B, dtype=bool)


@partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 10))
def _generate_cached(graphdef, params, enc_BxS, dec_BxP, lengths_B, knobs, n_new: int,
                     cache_len: int, greedy: bool, want_logits: bool, stop_at_eos: bool, key):
    model = merge_params(graphdef, params)
    cfg = model.cfg
    B, P = dec_BxP.shape
    cache = model.start_cache(B, cache_len, enc_BxS)
    positions = jnp.broadcast_to(jnp.arange(P)[None], (B, P))
    logits, cache = model.extend(dec_BxP, positions, cache)
    logits = logits[jnp.arange(B), lengths_B - 1]
    tok = _choose(logits, knobs, jax.random.fold_in(key, 0), cfg.pad_id, greedy)
    out = jnp.full((B, n_new), cfg.pad_id, jnp.int32).at[:, 0].set(tok)
    eos = cfg.eos_id if stop_at_eos else None
    done = _at_eos(tok, eos)
    lbuf = (jnp.zeros((B, n_new, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
            if want_logits else None)

    def cond(carry):
        t, _, _, done, _, _ = carry
        return (t < n_new) & ~jnp.all(done)

    def body(carry):
        t, tok, out, done, cache, lbuf = carry
        logits, cache = model.extend(tok[:, None], (lengths_B + t - 1)[:, None], cache)
        logits = logits[:, 0]
        new = _choose(logits, knobs, jax.random.fold_in(key, t), cfg.pad_id, greedy)
        new = jnp.where(done, cfg.pad_id, new)
        if lbuf is not None:
            lbuf = lbuf.at[:, t].set(logits)
        done = done | _at_eos(new, eos)
        return t + 1, new, out.at[:, t].set(new), done, cache, lbuf

    carry = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, done, cache, lbuf))
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
