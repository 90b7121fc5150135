"""Text generation: `inference(model, tokenizer, text)` with KV caches, and the full-recompute
reference it is checked against (the mirror of `tnt_jax/generate.py`).

Policy (prompts, truncation, padding, sampling rules) is `tnt.generation`'s, shared with JAX.

- `generate(..., use_cache=True)`: the encoder runs once, each layer's cross-attention keys and
  values are computed once, and the decoder keeps a preallocated self-attention KV cache
  `[B, H, cache_len, dh]` per layer. The prompt is prefilled in one pass, then one token per
  step; a step attends only to the cache columns written so far. Cached keys are stored as
  attention uses them: rotated at their own position (or, for `rope_mode="ngpt_reference"`,
  transformed as the reference code does) and, for ngpt, normalized and scaled by `s_qk`.
- `generate(..., use_cache=False)`: the seed's method, the whole model (encoder and decoder)
  run again for every new token; the reference for tests and the benchmark's baseline.
- `greedy`: the single-prompt greedy loop used for the end-of-run sample of
  `experiments.pretrain`.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

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
from tnt_torch.model import Mask, TnT, apply_reference_rope, apply_rope, attend, l2norm


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


# --- the cached decoder: the model's own layers, with attention reading and writing caches ------

def _qk_norm(attn, t: torch.Tensor) -> torch.Tensor:
    """ngpt: `s_qk * norm_dh(t)` (docs/design.md); rmsnorm: unchanged."""
    return l2norm(t) * attn.s_qk.view(attn.n_heads, attn.head_dim) if attn.ngpt else t


class _Request:
    """What one request computes once: fused weights, cross-attention keys/values, KV caches."""

    def __init__(self, model: TnT, batch: Batch, device: torch.device):
        cfg = model.cfg
        B, H, K = len(batch.lengths_B), cfg.n_heads, cfg.head_dim
        layers = model.decoder.layers
        self.model, self.H, self.K = model, H, K
        self.rope = model.rope(batch.cache_len, device)
        self.w_qkv = [torch.cat([layer.attn.wq, layer.attn.wk, layer.attn.wv], 1)
                      for layer in layers]
        self.w_in = [layer.mlp.w_in * (layer.mlp.s_uv * layer.mlp.sqrt_d) if layer.mlp.ngpt
                     else layer.mlp.w_in for layer in layers]
        self.head = model.lm_head * model.s_z if cfg.norm == "ngpt" else model.lm_head
        self.caches = [(torch.zeros(B, H, batch.cache_len, K, device=device),
                        torch.zeros(B, H, batch.cache_len, K, device=device)) for _ in layers]
        self.cross, self.cross_mask = None, None
        if batch.enc_BxS is not None:
            enc = torch.as_tensor(batch.enc_BxS, dtype=torch.long, device=device)
            enc_out = model.encode(enc)
            S = enc.shape[1]
            self.cross = []
            for layer in layers:
                kv = (enc_out @ torch.cat([layer.cross.wk, layer.cross.wv], 1)).view(B, S, 2, H, K)
                k = _qk_norm(layer.cross, kv[:, :, 0])
                self.cross.append((k.transpose(1, 2).contiguous(),
                                   kv[:, :, 1].transpose(1, 2).contiguous()))
            valid = enc != cfg.pad_id
            self.cross_mask = Mask(False, None if bool(valid.all()) else valid[:, None, None, :])

    def self_attention(self, i: int, attn, x_BxTxD, cols_BxT, n_cols: int | None):
        """Self-attention of new tokens at positions `cols_BxT`, writing layer i's cache.

        Prefill (`n_cols` None; every row from position 0) attends causally among the T prompt
        tokens; a decode step (T = 1) writes each row's key and value at its own position and
        attends to that row's cache columns up to it (`n_cols` = columns written in any row).
        """
        B, T, D = x_BxTxD.shape
        H, K = self.H, self.K
        qkv = (x_BxTxD @ self.w_qkv[i]).view(B, T, 3, H, K)
        cos, sin = self.rope
        if cos is None:  # rope_mode="ngpt_reference": `sin` holds the reference's table
            qk = apply_reference_rope(qkv[:, :, :2], sin[cols_BxT][:, :, None, None])
        else:
            qk = apply_rope(qkv[:, :, :2], cos[cols_BxT][:, :, None, None],
                            sin[cols_BxT][:, :, None, None])
        qk = _qk_norm(attn, qk)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1], qkv[:, :, 2]
        k_cache, v_cache = self.caches[i]
        if n_cols is None:
            k_cache[:, :, :T] = k.transpose(1, 2)
            v_cache[:, :, :T] = v.transpose(1, 2)
            y = attend(q, k.transpose(1, 2), v.transpose(1, 2), Mask(True, None), attn.scale)
        else:
            rows = torch.arange(B, device=x_BxTxD.device)
            k_cache[rows, :, cols_BxT[:, 0]] = k[:, 0]
            v_cache[rows, :, cols_BxT[:, 0]] = v[:, 0]
            keep = None  # one row sees every column written; rows of a batch see their own
            if B > 1:
                keep = (torch.arange(n_cols, device=x_BxTxD.device)[None, None, None, :]
                        <= cols_BxT[:, None, :, None])
            y = attend(q, k_cache[:, :, :n_cols], v_cache[:, :, :n_cols], Mask(False, keep),
                       attn.scale)
        return y.transpose(1, 2).reshape(B, T, D) @ attn.wo

    def mlp(self, i: int, mlp, x_BxTxD) -> torch.Tensor:
        """`MLP.forward` with the ngpt-scaled `w_in` computed once per request."""
        u, v = (x_BxTxD @ self.w_in[i]).split(mlp.hidden, dim=-1)
        act = F.gelu(v, approximate="none") if mlp.activation == "gelu" else F.silu(v)
        return (u * act) @ mlp.w_out

    def cross_attention(self, i: int, attn, x_BxTxD) -> torch.Tensor:
        B, T, D = x_BxTxD.shape
        q = _qk_norm(attn, (x_BxTxD @ attn.wq).view(B, T, self.H, self.K)).transpose(1, 2)
        k, v = self.cross[i]
        y = attend(q, k, v, self.cross_mask, attn.scale)
        return y.transpose(1, 2).reshape(B, T, D) @ attn.wo

    def logits(self, tokens_BxT, cols_BxT, n_cols: int | None) -> torch.Tensor:
        """The decoder stack (as `Stack.forward`) on new tokens; the last token's logits [B, V]
        for a decode step, all [B, T, V] for a prefill."""
        dec = self.model.decoder
        h = F.embedding(tokens_BxT, dec.embed)
        if dec.final_norm is None:
            h = l2norm(h)
        for i, layer in enumerate(dec.layers):
            h = layer._residual(h, layer.attn, "attn_norm", lambda x, i=i, layer=layer:
                                self.self_attention(i, layer.attn, x, cols_BxT, n_cols))
            if layer.cross is not None:
                h = layer._residual(h, layer.cross, "cross_norm", lambda x, i=i, layer=layer:
                                    self.cross_attention(i, layer.cross, x))
            h = layer._residual(h, layer.mlp, "mlp_norm",
                                lambda x, i=i, layer=layer: self.mlp(i, layer.mlp, x))
        if dec.final_norm is not None:
            h = dec.final_norm(h)
        return h


def _at_eos(tok_B: torch.Tensor, eos: int | None) -> torch.Tensor:
    return tok_B == eos if eos is not None else torch.zeros_like(tok_B, dtype=torch.bool)


def _device(model: TnT) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _generate_cached(model: TnT, batch: Batch, sampling: Sampling, want_logits: bool,
                     eos: int | None):
    cfg, device = model.cfg, _device(model)
    req = _Request(model, batch, device)
    dec = torch.as_tensor(batch.dec_BxP, dtype=torch.long, device=device)
    lengths = torch.as_tensor(batch.lengths_B, dtype=torch.long, device=device)
    B, P = dec.shape
    rows = torch.arange(B, device=device)
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    h = req.logits(dec, torch.arange(P, device=device).expand(B, P), None)
    logits = (h[rows, lengths - 1] @ req.head).float()
    tok = _choose(logits, sampling, gen, cfg.pad_id)
    out = torch.full((B, batch.n_new), cfg.pad_id, dtype=torch.long, device=device)
    out[:, 0] = tok
    done = _at_eos(tok, eos)
    lbuf = [logits] if want_logits else None
    longest = int(batch.lengths_B.max())
    for t in range(1, batch.n_new):
        if bool(done.all()):
            break
        h = req.logits(tok[:, None], (lengths + t - 1)[:, None], longest + t)
        logits = (h[:, 0] @ req.head).float()
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
        logits = model(enc, buf)[rows, pos]  # everything recomputed: encoder and decoder
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
