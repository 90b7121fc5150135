"""What a language-model harness asks of a TnT model, framework-free: the log-likelihood of a
continuation given a context, of a whole text in rolling windows, and generation up to stop strings.

The framework does two things only (`tnt_jax.score`, `tnt_torch.score`): `label_logprobs(model,
batch)`, the log-probability of each label of a training-shaped batch and whether it is the argmax,
and `generate`. Everything else is decided here once, so the two frameworks score every request
alike:

- **Layout.** decoder_only: the decoder reads context + continuation (but its last token) and the
  labels are the continuation's tokens at their positions; a sequence longer than the decoder's
  positions loses tokens from the left of the context. encoder_decoder: the encoder reads the
  context (its last `max_len_encoder` tokens) and the decoder reads `[bos] + continuation[:-1]`,
  scoring the continuation from the start token, as training does (docs/design.md, "decoding").
- **Batches.** Requests are sorted by length (longest first), padded with `pad_id` into batches of
  `batch_size` rows whose lengths are rounded up to a multiple of `BUCKET` (fewer shapes to
  compile), scored, and the results restored to the requests' order. Pad labels score nothing and
  pad keys are masked, so a batch gives each request's one-by-one values.
- **is_greedy** (the harness's definition): every continuation token is the argmax of its
  distribution.
- **Rolling windows.** A text is cut into consecutive target windows of the decoder's length; each
  is scored with as much preceding text as fits (the first with the prefix token), so every token
  is predicted exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tnt.config import ModelConfig

BUCKET = 16  # padded lengths are multiples of this (capped at the model's maxima)

# (model, batch of enc_tokens/dec_tokens/labels) -> (log p of each label [B, L], label == argmax [B, L])
LabelScorer = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


class HarnessError(ValueError):
    """A request the model cannot score, or a task the harness cannot run (the message says which)."""


@dataclass(frozen=True)
class Layout:
    """One request as the model reads it (int32 rows, not padded)."""

    enc: np.ndarray | None  # encoder tokens (encoder_decoder)
    dec: np.ndarray  # decoder input tokens
    labels: np.ndarray  # next-token labels of `dec`, pad where nothing is scored


def prefix_id(cfg: ModelConfig) -> int:
    """The token that stands for an empty context: bos, as `tnt.generation` starts an empty prompt,
    else eos (the document separator of the training stream)."""
    prefix = cfg.bos_id if cfg.bos_id is not None else cfg.eos_id
    if prefix is None:
        raise HarnessError("the model has neither bos_id nor eos_id: an empty context has no token")
    return prefix


def layout(cfg: ModelConfig, context: Sequence[int], continuation: Sequence[int]) -> Layout:
    """The model's inputs and labels for scoring `continuation` after `context` (module docstring)."""
    ctx = np.asarray(context, np.int32).reshape(-1)
    cont = np.asarray(continuation, np.int32).reshape(-1)
    if len(cont) == 0:
        raise HarnessError("a continuation to score needs at least one token")
    if len(cont) > cfg.max_len_decoder:
        raise HarnessError(f"continuation of {len(cont)} tokens does not fit the decoder's "
                             f"max_len_decoder={cfg.max_len_decoder} positions")
    if len(ctx) == 0:
        ctx = np.array([prefix_id(cfg)], np.int32)
    if cfg.has_encoder:
        if cfg.bos_id is None:
            raise HarnessError("encoder_decoder scoring starts the decoder from bos; the model has none")
        dec = np.concatenate([[cfg.bos_id], cont[:-1]]).astype(np.int32)
        return Layout(ctx[-cfg.max_len_encoder:], dec, cont)
    seq = np.concatenate([ctx, cont])[-(cfg.max_len_decoder + 1):]
    labels = seq[1:].copy()
    labels[:len(labels) - len(cont)] = cfg.pad_id
    return Layout(None, seq[:-1], labels)


def _round_up(n: int, cap: int) -> int:
    return min(cap, -(-n // BUCKET) * BUCKET)


def pad_batch(cfg: ModelConfig, rows: list[Layout], batch_size: int) -> dict[str, np.ndarray]:
    """Right-padded batch of `batch_size` rows (missing rows repeat the last one, so no row is all
    pad); lengths rounded up to a multiple of BUCKET."""
    rows = rows + [rows[-1]] * (batch_size - len(rows))
    L = _round_up(max(len(r.dec) for r in rows), cfg.max_len_decoder)
    dec = np.full((len(rows), L), cfg.pad_id, np.int32)
    labels = np.full((len(rows), L), cfg.pad_id, np.int32)
    for i, r in enumerate(rows):
        dec[i, :len(r.dec)], labels[i, :len(r.labels)] = r.dec, r.labels
    batch = {"dec_tokens": dec, "labels": labels}
    if cfg.has_encoder:
        S = _round_up(max(len(r.enc) for r in rows), cfg.max_len_encoder)
        enc = np.full((len(rows), S), cfg.pad_id, np.int32)
        for i, r in enumerate(rows):
            enc[i, :len(r.enc)] = r.enc
        batch["enc_tokens"] = enc
    return batch


def loglikelihoods(score: LabelScorer, cfg: ModelConfig, requests: Sequence[tuple[Sequence[int],
                   Sequence[int]]], batch_size: int = 16,
                   progress: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) of each (context, continuation) token request,
    in the requests' order, batched longest first; `progress(n)` after each batch of n."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows = [layout(cfg, c, x) for c, x in requests]
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i].dec) + len(
        rows[i].enc if rows[i].enc is not None else ())))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = pad_batch(cfg, [rows[i] for i in chunk], batch_size)
        logp_BxL, greedy_BxL = score(batch)
        scored_BxL = batch["labels"] != cfg.pad_id
        for j, i in enumerate(chunk):
            mask = scored_BxL[j]
            out[i] = (float(np.sum(logp_BxL[j][mask], dtype=np.float64)), bool(greedy_BxL[j][mask].all()))
        if progress is not None:
            progress(len(chunk))
    return out


def rolling_requests(cfg: ModelConfig, tokens: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(context, targets) windows whose targets cover `tokens` once, in order: targets of the
    decoder's length, each after all the text before it (`layout` keeps what fits)."""
    toks = np.asarray(tokens, np.int32).reshape(-1)
    size = cfg.max_len_decoder
    full = np.concatenate([[prefix_id(cfg)], toks]).astype(np.int32)
    return [(full[:start + 1], toks[start:start + size]) for start in range(0, len(toks), size)]


def rolling_loglikelihoods(score: LabelScorer, cfg: ModelConfig, texts: Sequence[Sequence[int]],
                           batch_size: int = 16, progress: Callable[[int], object] | None = None
                           ) -> list[float]:
    """log p of each whole token sequence, summed over its rolling windows (batched across texts)."""
    windows = [rolling_requests(cfg, t) for t in texts]
    flat = [w for ws in windows for w in ws]
    values = loglikelihoods(score, cfg, flat, batch_size, progress)
    out, at = [], 0
    for ws in windows:
        out.append(float(sum(v for v, _ in values[at:at + len(ws)])))
        at += len(ws)
    return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the earliest of the stop strings."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at >= 0:
                cut = min(cut, at)
    return text[:cut]
