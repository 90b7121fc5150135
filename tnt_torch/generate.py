"""Greedy decoding for the end-of-run sample (the mirror of `tnt_jax/generate.py`).

The decoder buffer has a fixed size padded with pad ids; causal and padding masks make the
not-yet-written tail invisible to the positions already decoded. Each step recomputes the whole
buffer: this is the reference that KV-cached decoding is checked against.
"""

from __future__ import annotations

import numpy as np
import torch

from tnt.data import check_token_ids
from tnt_torch.model import TnT


@torch.inference_mode()
def greedy(model: TnT, enc_tokens: np.ndarray | None, prefix: np.ndarray, n: int) -> np.ndarray:
    """Continue `prefix` (decoder tokens, 1-D) by `n` greedy tokens, stopping at eos."""
    cfg = model.cfg
    prefix = np.asarray(prefix, np.int64)
    length = min(len(prefix) + n, cfg.max_len_decoder)
    if len(prefix) == 0 or len(prefix) >= length:
        raise ValueError(f"prefix of length {len(prefix)} leaves no room to decode up to "
                         f"max_len_decoder={cfg.max_len_decoder}")
    check_token_ids(prefix, cfg.vocab_size, "prefix")
    device = next(model.parameters()).device
    enc, enc_out = None, None
    if cfg.has_encoder:
        if enc_tokens is None:
            raise ValueError("encoder_decoder model needs enc_tokens to decode")
        enc = torch.as_tensor(np.asarray(enc_tokens, np.int64)[None], device=device)
        enc_out = model.encode(enc)
    buf = torch.full((1, length), cfg.pad_id, dtype=torch.long, device=device)
    buf[0, :len(prefix)] = torch.as_tensor(prefix, device=device)
    out = []
    for pos in range(len(prefix) - 1, length - 1):
        logits = model.decode(buf, enc_out, enc) if enc_out is not None else model.decode(buf)
        t = int(torch.argmax(logits[0, pos], dim=-1))
        out.append(t)
        if t == cfg.eos_id:
            break
        buf[0, pos + 1] = t
    return np.asarray(out, np.int32)
