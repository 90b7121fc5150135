"""Greedy decoding for the end-of-run sample.

The decoder buffer has a fixed size, so the step is compiled once; causal and padding masks make
the not-yet-written tail invisible to the positions already decoded. (Issue 5 adds KV caches and
sampling; this full-recompute loop is the reference they are checked against.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnt.data import check_token_ids
from tnt_jax.model import TnT


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
