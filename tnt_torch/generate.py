"""Text generation: `inference(model, tokenizer, text)`, KV-cached, and the full-recompute
reference it is checked against.

Policy (prompts, truncation, padding, sampling rules) is `tnt.generation`'s, shared with JAX.

- `generate(..., use_cache=True)`: `TnT.start_cache` preallocates the self-attention caches, runs
  the encoder once and computes each layer's cross-attention keys and values once; the model's
  own `TnT.extend` prefills the prompt in one pass, then makes one token per row and step.
- `generate(..., use_cache=False)`: no cache, the whole model (encoder and decoder)
  run again for every new token; the reference for tests and the benchmark's baseline.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from tnt.data import has_pad
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
from tnt_torch.model import TnT

# --- sampling (tnt.generation.filter_logits is the numpy reference) -----------------------------

def filter_logits(logits_BxV: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  pad_id: int) -> torch.Tensor:
    """`logits / temperature` with pad, and everything outside top-k and top-p, set to -inf."""
    z = logits_BxV.float() / temperature
    z[:, pad_id] = -torch.inf
    s = torch.sort(z, dim=-1, descending=True).values
    rank = torch.arange(z.shape[-1], device=z.device).expand_as(s)
    keep = rank < top_k if top_k > 0 else torch.ones_like(s, dtype=torch.bool)
    if top_p < 1:
        p = torch.softmax(torch.where(keep, s, -torch.inf), dim=-1)
        keep = keep & ((torch.cumsum(p, dim=-1) - p) < top_p)
    n_keep = keep.sum(-1)
    thresh = s.gather(-1, (n_keep - 1)[:, None])
    return torch.where(z >= thresh, z, -torch.inf)


def _choose(logits_BxV: torch.Tensor, sampling: Sampling, gen: torch.Generator,
            pad_id: int) -> torch.Tensor:
    """The next token per row: argmax (greedy) or a draw from the filtered distribution."""
    if sampling.greedy:
        z = logits_BxV.clone()
        z[:, pad_id] = -torch.inf
        return z.argmax(-1)
    z = filter_logits(logits_BxV, sampling.temperature, sampling.top_k, sampling.top_p, pad_id)
    return torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]


def _at_eos(tok_B: torch.Tensor, eos: int | None) -> torch.Tensor:
    return tok_B == eos if eos is not None else torch.zeros_like(tok_B, dtype=torch.bool)


def _device(model: TnT) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _generate_cached(model: TnT, batch: Batch, sampling: Sampling, want_logits: bool,
                     eos: int | None):
    cfg, device = model.cfg, _device(model)
    dec = torch.as_tensor(batch.dec_BxP, dtype=torch.long, device=device)
    lengths = torch.as_tensor(batch.lengths_B, dtype=torch.long, device=device)
    B, P = dec.shape
    enc = (None if batch.enc_BxS is None else
           torch.as_tensor(batch.enc_BxS, dtype=torch.long, device=device))
    cache = model.start_cache(B, batch.cache_len, enc,
                              padded=has_pad({"enc_tokens": batch.enc_BxS}, cfg.pad_id))
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    logits, cache = model.extend(dec, torch.arange(P, device=device).expand(B, P), cache)
    logits = logits[torch.arange(B, device=device), lengths - 1]
    tok = _choose(logits, sampling, gen, cfg.pad_id)
    out = torch.full((B, batch.n_new), cfg.pad_id, dtype=torch.long, device=device)
    out[:, 0] = tok
    done = _at_eos(tok, eos)
    lbuf = [logits] if want_logits else None
    for t in range(1, batch.n_new):
        if bool(done.all()):
            break
        logits, cache = model.extend(tok[:, None], (lengths + t - 1)[:, None], cache,
                                     check_ids=False)  # ids the model chose
        logits = logits[:, 0]
        tok = torch.where(done, cfg.pad_id, _choose(logits, sampling, gen, cfg.pad_id))
        out[:, t] = tok
        done |= _at_eos(tok, eos)
        if lbuf is not None:
            lbuf.append(logits)
    return out, lbuf


@torch.inference_mode()
def _generate_uncached(model: TnT, batch: Batch, sampling: Sampling, want_logits: bool,
                       eos: int | None):
    cfg, device = model.cfg, _device(model)
    B, n = len(batch.lengths_B), batch.n_new
    lengths = torch.as_tensor(batch.lengths_B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    buf = torch.full((B, batch.fed_len), cfg.pad_id, dtype=torch.long, device=device)
    width = min(batch.dec_BxP.shape[1], batch.fed_len)
    buf[:, :width] = torch.as_tensor(batch.dec_BxP[:, :width], dtype=torch.long)
    enc = (None if batch.enc_BxS is None else
           torch.as_tensor(batch.enc_BxS, dtype=torch.long, device=device))
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    out = torch.full((B, n), cfg.pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lbuf = [] if want_logits else None
    for t in range(n):
        pos = lengths - 1 + t
        # everything recomputed, encoder and decoder; the ids are the prompt's and the model's own
        logits = model(enc, buf, check_ids=False)[rows, pos]
        tok = torch.where(done, cfg.pad_id, _choose(logits, sampling, gen, cfg.pad_id))
        out[:, t] = tok
        done |= _at_eos(tok, eos)
        if lbuf is not None:
            lbuf.append(logits)
        if bool(done.all()):
            break
        if t < n - 1:
            buf[rows, pos + 1] = tok
    return out, lbuf


def generate(model: TnT, prompts: list[np.ndarray], max_new_tokens: int,
             sampling: Sampling = GREEDY, *, use_cache: bool = True,
             return_logits: bool = False, warn: bool = True, stop_at_eos: bool = True
             ) -> Generation:
    """Decode a batch of token-id prompts (encoder inputs for encoder_decoder, prefixes for
    decoder_only) by up to `max_new_tokens` each; see `tnt.generation` for the policy.
    `stop_at_eos=False` makes exactly `max_new_tokens` (benchmarks)."""
    cfg = model.cfg
    batch = prepare(cfg, prompts, max_new_tokens, 1, warn)
    run = _generate_cached if use_cache else _generate_uncached
    eos = cfg.eos_id if stop_at_eos else None
    with model.decoding():
        out, lbuf = run(model, batch, sampling, return_logits, eos)
    logits = None
    if return_logits:
        logits = np.zeros((len(batch.lengths_B), batch.n_new, cfg.vocab_size), np.float32)
        logits[:, :len(lbuf)] = torch.stack(lbuf, 1).cpu().numpy()
    return collect(batch, out.cpu().numpy().astype(np.int32), logits, eos)


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
                         input_text, max_length, Sampling(temperature, top_k, top_p, seed))
