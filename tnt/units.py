"""Units that compare across tokenizers: bits per token and bits per byte.

A loss in nats per token depends on the vocabulary: a BPE token carries several bytes, a byte
token one. Bits per byte divides the bits by the bytes of text the tokens stand for, counted from
the UTF-8 text itself (never from the number of tokens), so a byte run and a BPE run of the same
text can be compared. For a token stream of `n_tokens` that encodes `n_bytes` bytes of text
(eos and other special tokens count as tokens and as zero bytes):

    bits/token = nats/token / ln 2,    bits/byte = bits/token * n_tokens / n_bytes.

Applied to a loss measured on windows of a split, it uses that split's average bytes per token.
"""

from __future__ import annotations

import math

import numpy as np


def bits_per_token(nats_per_token: float) -> float:
    return nats_per_token / math.log(2)


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    if n_tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive token and byte count, got "
                         f"{n_tokens} tokens and {n_bytes} bytes")
    return bits_per_token(nats_per_token) * n_tokens / n_bytes


def text_bytes(texts: list[str]) -> int:
    """UTF-8 bytes of the documents (what a byte-level model would see, without eos)."""
    return sum(len(t.encode("utf-8")) for t in texts)


def stream_bytes(tokenizer, tokens: np.ndarray, chunk: int = 1 << 20) -> int:
    """UTF-8 bytes of the text a token stream decodes to, for a stream whose text is gone (a token
    folder written before byte counts were recorded). Decoded in eos-aligned chunks so that a
    multi-byte character is never cut."""
    eos = np.flatnonzero(np.asarray(tokens) == tokenizer.eos_id)
    bounds = [0]
    for e in eos:
        if e + 1 - bounds[-1] >= chunk:
            bounds.append(int(e) + 1)
    bounds.append(len(tokens))
    return sum(len(tokenizer.decode(np.asarray(tokens[a:b])).encode("utf-8"))
               for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)
