"""Corpora, token files and batches, the same for both frameworks (docs/design.md, "objective").

A corpus becomes two flat token streams (train, val) in which every document ends with eos.
Sources: `stdlib` (the .py files of the running interpreter's standard library, sorted, split
by a hash of the file's relative path, so the split never depends on the machine), any text file
or folder, or a folder written by `python -m experiments.prepare` (`meta.json` plus raw token
files, memory-mapped so that corpora larger than RAM work).

Batches are a pure function of (seed, step): the data position of a run is its step counter, so
resuming reproduces exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tnt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, tokenizer_from_spec
from tnt.units import stream_bytes, text_bytes

META_FILE = "meta.json"


class DataError(ValueError):
    """A data path or corpus cannot be used; the message names the path and the problem."""


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray  # 1-D token ids (uint16/uint32), possibly a memmap
    val: np.ndarray
    source: str
    train_bytes: int | None = None  # UTF-8 bytes of the text behind each split (tnt/units.py);
    val_bytes: int | None = None  # None for a token folder written before they were recorded

    def split_bytes(self, split: str) -> int:
        """Bytes of text behind a split, decoded from its tokens when they were not recorded."""
        recorded = getattr(self, f"{split}_bytes")
        return recorded if recorded is not None else stream_bytes(self.tokenizer, getattr(self, split))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(source: str) -> list[tuple[str, Path]]:
    """(relative name, path) of every document of a `stdlib`/file/folder source, sorted."""
    if source == "stdlib":
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    else:
        root = Path(source)
        if not root.exists():
            raise DataError(f"data path {source!r} does not exist")
        if root.is_file():
            return [(root.name, root)]
        files = [p for p in root.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    docs = sorted((p.relative_to(root).as_posix(), p) for p in files)
    if not docs:
        raise DataError(f"data path {source!r} contains no files")
    return docs


def is_val_file(name: str, val_percent: float) -> bool:
    """The deterministic split by file: a hash of the relative name, not the machine's order."""
    return zlib.crc32(name.encode("utf-8")) % 10000 < val_percent * 100


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def split_documents(source: str, val_percent: float) -> tuple[list[str], list[str]]:
    """Texts of the train and val documents. A single document is split by position instead."""
    docs = text_files(source)
    texts = [(name, read_text(p)) for name, p in docs]
    texts = [(n, t) for n, t in texts if t]
    if not texts:
        raise DataError(f"data path {source!r} is empty (no text in {len(docs)} file(s))")
    if len(texts) == 1:
        text = texts[0][1]
        cut = int(len(text) * (1 - val_percent / 100))
        return [text[:cut]], [text[cut:]]
    train = [t for n, t in texts if not is_val_file(n, val_percent)]
    val = [t for n, t in texts if is_val_file(n, val_percent)]
    if not val:  # few files: keep the split by file, but never leave val empty
        val = [train.pop()]
    if not train:
        train = [val.pop()]
    return train, val


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """One stream: each document's tokens followed by eos."""
    if isinstance(tokenizer, BPETokenizer):
        parts = tokenizer.encode_batch(texts)
    else:
        parts = [tokenizer.encode(t) for t in texts]
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    stream = np.concatenate([x for p in parts for x in (p, eos)])
    return stream.astype(token_dtype(tokenizer.vocab_size))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_prepared(source: str) -> bool:
    return (Path(source) / META_FILE).is_file()


def load_corpus(source: str, tokenizer: Tokenizer | str = "byte", val_percent: float = 5.0,
                bpe_vocab_size: int = 1024) -> Corpus:
    """Load a corpus. `tokenizer` is a tokenizer object, "byte"/"bpe" to make one, or the path of
    a Hugging Face `tokenizer.json`.

    A prepared token folder carries its own tokenizer; passing a different one is an error.
    """
    if source != "stdlib" and not Path(source).exists():
        raise DataError(f"data path {source!r} does not exist")
    if is_prepared(source):
        corpus = read_token_dir(source)
        if not isinstance(tokenizer, str) and tokenizer.spec != corpus.tokenizer.spec:
            raise DataError(f"token folder {source!r} was written with a different tokenizer "
                            f"({corpus.tokenizer.spec['kind']}, vocab "
                            f"{corpus.tokenizer.vocab_size}) than the run's ({tokenizer.spec['kind']},"
                            f" vocab {tokenizer.vocab_size})")
        return corpus
    train_texts, val_texts = split_documents(source, val_percent)
    if isinstance(tokenizer, str):
        tokenizer = make_tokenizer(tokenizer, train_texts, bpe_vocab_size)
    return Corpus(tokenizer, encode_documents(tokenizer, train_texts),
                  encode_documents(tokenizer, val_texts), source, text_bytes(train_texts),
                  text_bytes(val_texts))


def make_tokenizer(kind: str, train_texts: list[str], bpe_vocab_size: int) -> Tokenizer:
    """The tokenizer named "byte", "bpe" (trained on `train_texts`) or by a tokenizer.json path."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_texts, bpe_vocab_size)
    try:
        return BPETokenizer.from_file(kind)
    except Exception as e:  # OSError, or the bare Exception the tokenizers library raises
        raise DataError(f"tokenizer {kind!r} is not byte, bpe or a readable Hugging Face "
                        f"tokenizer.json: {e}") from e


def write_token_dir(corpus: Corpus, out: str | Path) -> Path:
    """Write `train.bin`, `val.bin` (raw little-endian ids) and `meta.json` atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(corpus.tokenizer.vocab_size)
    meta = {"format": "tnt-tokens-v1", "dtype": dtype.name, "source": corpus.source,
            "tokenizer": corpus.tokenizer.spec}
    for split in ("train", "val"):
        arr = np.ascontiguousarray(getattr(corpus, split), dtype=dtype.newbyteorder("<"))
        tmp = out / f".{split}.bin.tmp"
        arr.tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        meta[f"{split}_tokens"] = int(arr.size)
        if getattr(corpus, f"{split}_bytes") is not None:
            meta[f"{split}_bytes"] = getattr(corpus, f"{split}_bytes")
    tmp = out / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / META_FILE)
    return out


def read_token_dir(path: str | Path) -> Corpus:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        tokenizer = tokenizer_from_spec(meta["tokenizer"])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path / META_FILE} is not a valid token folder description: {e}") from e
    splits = {}
    for split in ("train", "val"):
        f = path / f"{split}.bin"
        if not f.is_file():
            raise DataError(f"token folder {path} has no {split}.bin")
        n = f.stat().st_size // dtype.itemsize
        if n != meta.get(f"{split}_tokens"):
            raise DataError(f"{f} holds {n} tokens but {META_FILE} says {meta.get(f'{split}_tokens')}")
        splits[split] = np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    return Corpus(tokenizer, splits["train"], splits["val"], meta.get("source", str(path)),
                  meta.get("train_bytes"), meta.get("val_bytes"))


def check_token_ids(tokens: np.ndarray, vocab_size: int, what: str = "tokens") -> None:
    """Reject ids outside [0, vocab): JAX's gather would clamp them silently."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(tokens == bad)[0])
        raise ValueError(f"{what} contain token id {bad} at index {where}, outside "
                         f"[0, vocab_size={vocab_size})")


@dataclass(frozen=True)
class BatchSpec:
    """What a batch looks like: the objective of docs/design.md for an arch."""

    arch: str
    batch_size: int
    seq_len: int  # decoder length
    enc_len: int  # encoder length (encoder_decoder only)
    bos_id: int | None  # the decoder's first input (encoder_decoder only)

    @property
    def window(self) -> int:
        if self.arch == "encoder_decoder":
            return self.enc_len + self.seq_len
        return self.seq_len + 1

    def make(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """Token windows [B, window] -> the model's inputs and labels (int32).

        encoder_decoder (prefix continuation): the encoder reads the first `enc_len` tokens, the
        decoder reads `[bos] + target[:-1]` and predicts `target`, the next `seq_len` tokens.
        decoder_only: next-token prediction, inputs `w[:-1]`, labels `w[1:]`.
        """
        w = windows.astype(np.int32)
        if self.arch == "encoder_decoder":
            target = w[:, self.enc_len:]
            bos = np.full((w.shape[0], 1), self.bos_id, np.int32)
            return {"enc_tokens": w[:, :self.enc_len],
                    "dec_tokens": np.concatenate([bos, target[:, :-1]], axis=1),
                    "labels": target}
        return {"dec_tokens": w[:, :-1], "labels": w[:, 1:]}


class Batches:
    """Training batches drawn at random offsets from (seed, step); eval batches in fixed order."""

    def __init__(self, spec: BatchSpec, train: np.ndarray, val: np.ndarray, seed: int) -> None:
        for name, stream in (("train", train), ("val", val)):
            if len(stream) < spec.window:
                raise DataError(
                    f"the {name} split has {len(stream)} tokens, fewer than one batch window of "
                    f"{spec.window} tokens ({spec.arch}: "
                    + (f"enc_len {spec.enc_len} + seq_len {spec.seq_len})"
                       if spec.arch == "encoder_decoder" else f"seq_len {spec.seq_len} + 1)")
                    + "; use more data or a shorter --seq-len")
        self.spec, self.train, self.val, self.seed = spec, train, val, seed
        self._offsets = np.arange(spec.window)

    def _take(self, stream: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        return self.spec.make(np.asarray(stream[starts[:, None] + self._offsets]))

    def train_batch(self, step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """The global batch of `step`, or only its `rows` (a process's share in a distributed
        run: the same rows of the same batch, and only those are read from the stream)."""
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.train) - self.spec.window + 1, self.spec.batch_size)
        return self._take(self.train, starts[rows])

    def eval_batches(self, n: int) -> Iterator[dict[str, np.ndarray]]:
        """`n` batches of windows spread evenly over the val stream (the same every time)."""
        last = len(self.val) - self.spec.window
        count = n * self.spec.batch_size
        starts = np.linspace(0, last, count).astype(np.int64)
        for i in range(n):
            yield self._take(self.val, starts[i * self.spec.batch_size:(i + 1) * self.spec.batch_size])
