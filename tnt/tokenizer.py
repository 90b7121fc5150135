"""Tokenizers: byte-level (the default, nothing to download), a locally trained BPE, and any
Hugging Face `tokenizer.json`.

The byte tokenizer and the trained BPE reserve ids 0, 1, 2 for pad, bos and eos; a tokenizer.json
keeps its own special ids (`map_special_ids`). A tokenizer is described by a small JSON-able
`spec` that is saved in every checkpoint, so that a model is never paired with the wrong
vocabulary: `tokenizer_from_spec` rebuilds it (the BPE spec carries the whole vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tnt.special_ids import ROLE_TOKENS

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


def map_special_ids(tok) -> tuple[dict[str, int], list[str]]:
    """pad/bos/eos ids of a `tokenizers.Tokenizer`, adding `<pad>`/`<bos>`/`<eos>` as special tokens
    (growing the vocabulary) for any role the tokenizer has no special token for. Only the
    tokenizer's special (added) tokens are candidates: a BPE vocabulary may hold `<s>` as ordinary
    text, which must never become bos. Returns the ids by role and the names added. Deterministic,
    so a saved tokenizer (with its additions) maps the same way again."""
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    ids, added = {}, []
    for field, names in ROLE_TOKENS.items():
        role = field.removesuffix("_id")
        found = next((specials[n] for n in names if n in specials), None)
        if found is None:
            name = f"<{role}>"
            tok.add_special_tokens([name])
            found, added = tok.token_to_id(name), added + [name]
            specials[name] = found
        ids[role] = found
    return ids, added


class BPETokenizer:
    """A Hugging Face `tokenizers` tokenizer: a byte-level BPE trained locally (kind "bpe", no
    download) or any `tokenizer.json` (kind "hf"; GPT-2's BPE is what the nGPT paper used). Its
    pad/bos/eos come from `map_special_ids`; the whole tokenizer.json travels in the spec."""

    def __init__(self, tok, kind: str = "bpe") -> None:
        ids, self.added_specials = map_special_ids(tok)
        self._tok, self.kind = tok, kind
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]

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
    def from_json(cls, text: str, kind: str = "bpe") -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), kind)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """A Hugging Face `tokenizer.json` (kind "hf")."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"), "hf")

    @property
    def note(self) -> str | None:
        """What was added to the vocabulary, for the entry points to say."""
        if not self.added_specials:
            return None
        return (f"tokenizer: added {', '.join(self.added_specials)} (absent from it) as special "
                f"tokens; vocabulary grown to {self.vocab_size}")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32)
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        vocab = self.vocab_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < vocab], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._tok.to_str())

    @property
    def spec(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "json": self._tok.to_str()}


Tokenizer = ByteTokenizer | BPETokenizer


def tokenizer_from_spec(spec: dict) -> Tokenizer | None:
    """The tokenizer a spec describes; None for kind "none" (weights imported from elsewhere,
    e.g. the nGPT reference, whose tokenizer TnT cannot ship: bring your own ids)."""
    kind = spec.get("kind")
    if kind == "none":
        return None
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "hf"):
        return BPETokenizer.from_json(spec["json"], kind)
    raise ValueError(f"unknown tokenizer kind {kind!r} in tokenizer spec")


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two specs describe the same vocabulary. A tokenizer.json compares its model (vocab
    and merges) and added tokens; trained ("bpe") and imported ("hf") ones are the same family."""
    family = lambda s: "json" if s.get("kind") in ("bpe", "hf") else s.get("kind")  # noqa: E731
    if family(a) != family(b) or a.get("vocab_size") != b.get("vocab_size"):
        return False
    if family(a) == "json":
        vocab = lambda s: (json.loads(s["json"])["model"], json.loads(s["json"])["added_tokens"])  # noqa: E731
        return vocab(a) == vocab(b)
    return True
