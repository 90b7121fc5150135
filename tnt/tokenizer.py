"""Tokenizers: byte-level (the default, nothing to download) and a locally trained BPE.

Both reserve ids 0, 1, 2 for pad, bos and eos. A tokenizer is described by a small JSON-able
`spec` that is saved in every checkpoint, so that a model is never paired with the wrong
vocabulary: `tokenizer_from_spec` rebuilds it (the BPE spec carries the whole vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
FIRST_ID = len(SPECIALS)  # the first id that is neither pad, bos nor eos


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: ids 0..2 are pad/bos/eos, byte b is id b+3 (vocab 259)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    offset = len(SPECIALS)
    vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")

    @property
    def spec(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


class BPETokenizer:
    """A byte-level BPE trained locally with the `tokenizers` library (no download)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, tok) -> None:
        self._tok = tok
        for i, s in enumerate(SPECIALS):
            if tok.token_to_id(s) != i:
                raise ValueError(f"BPE tokenizer must map {s} to id {i}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"bpe_vocab_size must be at least {256 + len(SPECIALS)}, "
                             f"got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) >= len(SPECIALS)])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._tok.to_str())

    @property
    def spec(self) -> dict:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "json": self._tok.to_str()}


Tokenizer = ByteTokenizer | BPETokenizer


def tokenizer_from_spec(spec: dict) -> Tokenizer | None:
    """The tokenizer a spec describes; None for kind "none" (weights imported from elsewhere,
    e.g. the nGPT reference, whose tokenizer TnT cannot ship: bring your own ids)."""
    kind = spec.get("kind")
    if kind == "none":
        return None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_json(spec["json"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in tokenizer spec")


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two specs describe the same vocabulary (BPE compares the full vocab and merges)."""
    if a.get("kind") != b.get("kind") or a.get("vocab_size") != b.get("vocab_size"):
        return False
    if a.get("kind") == "bpe":
        model = lambda s: json.loads(s["json"])["model"]  # noqa: E731
        return model(a) == model(b)
    return True
