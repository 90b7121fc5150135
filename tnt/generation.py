"""Text generation policy shared by both frameworks: prompts, lengths, padding, sampling rules.

`tnt_jax.generate` and `tnt_torch.generate` run the model; everything that decides *what* they
run lives here once, in numpy, so the two cannot disagree:

- **Prompts.** encoder_decoder: the prompt goes to the encoder and decoding starts from
  `[bos]`, as training does (docs/design.md, "decoding"). decoder_only: the prompt is the decoder's
  prefix and the answer is its continuation; an empty prompt becomes `[bos]` (the only way to
  give the model a position to predict from), and is refused when the model has no bos
  (`bos_id=None`, e.g. an imported vocabulary without a start token). A prompt may hold any id
  but `pad_id` (docs/design.md, "Special ids").
- **Lengths.** `max_new_tokens` is capped at `max_len_decoder` (a notice says so). A prompt
  that does not fit keeps its *last* tokens and a `PromptTruncated` warning names the lengths:
  encoder prompts keep `max_len_encoder` tokens; decoder_only prompts keep
  `max_len_decoder - max_new_tokens + 1`, so that the prompt and every new token but the last
  (which is never fed back) fit the decoder's positions.
- **Batches.** A list of prompts is right-padded with `pad_id` into one batch: every sequence
  keeps positions 0, 1, ... (docs/design.md's RoPE "positions from 0 per sequence"), pad keys are
  masked, and each row writes its new tokens at its own position. So a batch gives the same
  tokens as its prompts one at a time.
- **Sampling** (`filter_logits`, mirrored in both frameworks): `pad_id` is never generated (a
  pad is an invisible key to the model, so it cannot be part of a text); `temperature == 0`
  is greedy (argmax); otherwise logits are divided by the temperature and filtered by `top_k`
  (0: off) and `top_p` (1: off), both on the descending sort, ties at the threshold kept.
- **Stopping.** A row stops at `eos_id` (not included in the output); the batch stops when every
  row has stopped or `max_new_tokens` are made. With `eos_id=None` there is no stop token and
  every row gets `max_new_tokens`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from tnt.config import MAX_SEED, ModelConfig
from tnt.data import check_token_ids
from tnt.special_ids import NAMES, special_id_collisions


class PromptTruncated(UserWarning):
    """A prompt or `max_new_tokens` did not fit the model and was shortened (message says how)."""


class TokenizerMismatch(ValueError):
    """The tokenizer does not belong to the model or checkpoint it is used with."""


def check_seed(seed) -> None:
    """A sampling seed every framework's generator takes: an integer in [0, 2**63 - 1]."""
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. `temperature == 0` (the default) is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 is off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 is off), got {self.top_p}")
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    """Refuse a tokenizer whose vocabulary or special ids cannot be the model's: a special id
    the tokenizer declares (not None) must be the model's, and none of the model's may be a real
    token of the tokenizer (`tnt.special_ids`)."""
    problems = []
    if tokenizer.vocab_size > cfg.vocab_size:
        problems.append(f"its vocab_size {tokenizer.vocab_size} exceeds the model's "
                        f"{cfg.vocab_size}")
    for name in NAMES:
        theirs = getattr(tokenizer, name, None)
        if theirs is not None and theirs != getattr(cfg, name):
            problems.append(f"its {name} is {theirs}, the model's is {getattr(cfg, name)}")
    problems += special_id_collisions({n: getattr(cfg, n) for n in NAMES}, tokenizer)
    if problems:
        raise TokenizerMismatch("the tokenizer does not match the model: " + "; ".join(problems))


def check_inference_args(model, tokenizer, input_text, max_length, seed) -> None:
    """The arguments of both frameworks' `inference`, checked before anything runs, so that a
    wrong one is named (TypeError/ValueError) instead of failing deep inside the decoder."""
    if not isinstance(getattr(model, "cfg", None), ModelConfig):
        raise TypeError(f"model must be a TnT model (tnt_jax.TnT or tnt_torch.TnT, e.g. from "
                        f"load_checkpoint), got {type(model).__name__}")
    if not all(hasattr(tokenizer, a) for a in ("encode", "decode", "vocab_size", "pad_id")):
        raise TypeError(f"tokenizer must be a TnT tokenizer (tnt.tokenizer.ByteTokenizer or "
                        f"BPETokenizer, e.g. from load_checkpoint), got {type(tokenizer).__name__}")
    texts = [input_text] if isinstance(input_text, str) else input_text
    if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"input_text must be a string or a list of strings, got "
                        f"{type(input_text).__name__}")
    if len(texts) == 0:
        raise ValueError("input_text is an empty list; give at least one prompt")
    if not isinstance(max_length, int | np.integer) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
    check_seed(seed)



def check_tokenizer_spec(spec: dict, expected: dict, where: str) -> None:
    """Refuse a tokenizer (by spec) that differs from the one saved in a checkpoint."""
    from tnt.tokenizer import same_tokenizer

    if not same_tokenizer(spec, expected):
        raise TokenizerMismatch(
            f"the tokenizer ({spec.get('kind')}, vocab {spec.get('vocab_size')}) is not the one "
            f"{where} was trained with ({expected.get('kind')}, vocab "
            f"{expected.get('vocab_size')})")


@dataclass
class Batch:
    """Prompts laid out for decoding (see the module docstring for the policy)."""

    dec_BxP: np.ndarray  # int32 decoder prompts, right-padded with pad_id
    lengths_B: np.ndarray  # int32 real prompt lengths (>= 1)
    n_new: int  # new tokens to make per row (at most)
    cache_len: int  # decoder positions a KV cache needs (>= P)
    enc_BxS: np.ndarray | None = None  # int32 encoder prompts, right-padded (encoder_decoder)
    notices: list[str] = field(default_factory=list)

    @property
    def fed_len(self) -> int:
        """Decoder positions a full recompute needs: the longest prompt plus n_new - 1."""
        return int(self.lengths_B.max()) + self.n_new - 1


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple) if multiple > 1 else n


def _pad_right(rows: list[np.ndarray], length: int, pad: int) -> np.ndarray:
    out = np.full((len(rows), length), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def prepare(cfg: ModelConfig, prompts: list[np.ndarray], max_new_tokens: int,
            bucket: int = 1, warn: bool = True) -> Batch:
    """Truncate, pad and size a list of token-id prompts for decoding.

    `bucket` rounds the padded prompt lengths up to a multiple (capped by the model's maxima), so
    a compiled decoder sees few distinct shapes; extra columns are pad and masked. Notices about
    shortened prompts are returned in `Batch.notices` and, with `warn`, issued as
    `PromptTruncated` warnings.
    """
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise ValueError("no prompt given")
    for i, p in enumerate(prompts):
        kind = np.asarray(p).dtype.kind if p is not None else "none"
        if kind not in "iu" and not (kind == "f" and np.size(p) == 0):  # [] reads as float
            raise TypeError(f"prompt {i} must be a sequence of integer token ids, got "
                            f"{type(p).__name__} of {kind if kind == 'none' else np.asarray(p).dtype}")
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    for i, p in enumerate(prompts):
        check_token_ids(p, cfg.vocab_size, f"prompt {i}")
        if (p == cfg.pad_id).any():
            raise ValueError(f"prompt {i} contains pad_id={cfg.pad_id} at position "
                             f"{int(np.argmax(p == cfg.pad_id))}: padding is not a token")
        if len(p) == 0 and cfg.bos_id is None and not cfg.has_encoder:
            raise ValueError(f"prompt {i} is empty and the model has no start token "
                             f"(bos_id=None): give at least one token id")
    notices: list[str] = []
    n_new = int(max_new_tokens)
    if n_new > cfg.max_len_decoder:
        notices.append(f"max_new_tokens={n_new} exceeds the decoder's {cfg.max_len_decoder} "
                       f"positions; making at most {cfg.max_len_decoder}")
        n_new = cfg.max_len_decoder
    which = (lambda i: f"prompt {i} " if len(prompts) > 1 else "prompt ")  # noqa: E731
    enc = None
    if cfg.has_encoder:
        keep = cfg.max_len_encoder
        rows = []
        for i, p in enumerate(prompts):
            if len(p) > keep:
                notices.append(f"{which(i)}has {len(p)} tokens, more than the encoder's "
                               f"max_len_encoder={keep}; keeping its last {keep}")
                p = p[-keep:]
            rows.append(p)
        S = _round_up(max(1, max(len(r) for r in rows)), bucket, cfg.max_len_encoder)
        enc = _pad_right(rows, S, cfg.pad_id)
        dec_rows = [np.array([cfg.bos_id], np.int32) for _ in prompts]
    else:
        keep = cfg.max_len_decoder - n_new + 1
        dec_rows = []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                p = np.array([cfg.bos_id], np.int32)
            if len(p) > keep:
                notices.append(f"{which(i)}has {len(p)} tokens; with max_new_tokens={n_new} the "
                               f"decoder's max_len_decoder={cfg.max_len_decoder} positions hold "
                               f"{keep} prompt tokens, keeping its last {keep}")
                p = p[-keep:]
            dec_rows.append(p)
    lengths = np.array([len(r) for r in dec_rows], np.int32)
    P = _round_up(int(lengths.max()), bucket, cfg.max_len_decoder)
    cache_len = max(P, min(cfg.max_len_decoder, P + n_new - 1))
    if warn:
        for n in notices:
            warnings.warn(n, PromptTruncated, stacklevel=3)
    return Batch(_pad_right(dec_rows, P, cfg.pad_id), lengths, n_new, cache_len, enc, notices)


def finish(tokens_BxN: np.ndarray, eos_id: int | None) -> list[np.ndarray]:
    """Each row's new tokens up to (not including) its first eos (None: all of them)."""
    if eos_id is None:
        return list(np.asarray(tokens_BxN))
    out = []
    for row in np.asarray(tokens_BxN):
        stop = np.flatnonzero(row == eos_id)
        out.append(row[:stop[0]] if len(stop) else row)
    return out


def filter_logits(logits_BxV: np.ndarray, temperature: float, top_k: int, top_p: float,
                  pad_id: int) -> np.ndarray:
    """The numpy reference of the sampling filter both frameworks implement (float32).

    `z = logits / temperature` with `z[pad] = -inf`; on `z` sorted descending, keep the first
    `top_k` (if > 0), then of those the shortest prefix whose probability mass (softmax of the
    kept) reaches `top_p` (if < 1), i.e. the entries whose *exclusive* cumulative mass is below
    `top_p`; every token whose `z` is at least the last kept value stays, the rest are -inf.
    """
    z = np.asarray(logits_BxV, np.float32) / np.float32(temperature)
    z[:, pad_id] = -np.inf
    s = -np.sort(-z, axis=-1)
    V = z.shape[-1]
    keep = np.ones_like(s, dtype=bool)
    if top_k > 0:
        keep &= np.arange(V)[None] < top_k
    if top_p < 1:
        masked = np.where(keep, s, -np.inf)
        p = np.exp(masked - masked[:, :1])
        p /= p.sum(-1, keepdims=True)
        keep &= (np.cumsum(p, -1) - p) < top_p
    n_keep = keep.sum(-1)
    thresh = np.take_along_axis(s, (n_keep - 1)[:, None], -1)
    return np.where(z >= thresh, z, -np.inf).astype(np.float32)


@dataclass
class Generation:
    """New token ids per row (eos excluded); with `return_logits`, each row's next-token logits
    [n_made, V] (the last row is the eos's logits when the row stopped at eos)."""

    tokens: list[np.ndarray]
    logits: list[np.ndarray] | None = None
    notices: list[str] = field(default_factory=list)


def collect(batch: Batch, tokens_BxN: np.ndarray, logits_BxNxV: np.ndarray | None,
            eos_id: int | None) -> Generation:
    """Cut each row at its first eos (None: keep all); keep the logits of the tokens made (eos
    included)."""
    tokens = finish(tokens_BxN, eos_id)
    logits = None
    if logits_BxNxV is not None:
        logits = [np.asarray(logits_BxNxV[i, :min(len(t) + 1, batch.n_new)], np.float32)
                  for i, t in enumerate(tokens)]
    return Generation(tokens, logits, batch.notices)


def run_inference(generate, cfg: ModelConfig, tokenizer, input_text, max_length: int,
                  sampling: Sampling, **kw):
    """The framework-free body of `inference`: tokenize, decode with `generate`, detokenize.

    `generate(prompts, max_new_tokens, sampling, **kw) -> Generation` is the framework's.
    """
    check_tokenizer(tokenizer, cfg)
    single = isinstance(input_text, str)
    texts = [input_text] if single else list(input_text)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("input_text must be a string or a list of strings")
    out = generate([tokenizer.encode(t) for t in texts], max_length, sampling, **kw)
    decoded = [tokenizer.decode(ids) for ids in out.tokens]
    return decoded[0] if single else decoded
