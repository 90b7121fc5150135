"""Corpora, token files and batches, the same for both frameworks (docs/design.md, "objective").

A corpus becomes two flat token streams (train, val) in which every document ends with eos.
Sources: `stdlib` (the .py files of the running interpreter's standard library, sorted, split
by a hash of the file's relative path, so the split never depends on the machine), any text file
or folder (binary files skipped), a dataset read through `datasets` (tnt/hf_data.py: parquet,
jsonl, arrow, `save_to_disk`, `hf:OWNER/NAME`), or a folder written by `python -m
experiments.prepare` (`meta.json` plus raw token files, memory-mapped so that corpora larger than
RAM work).

Batches are a pure function of (seed, step): the data position of a run is its step counter, so
resuming reproduces exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tnt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, tokenizer_from_spec
from tnt.units import stream_bytes, text_bytes

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")


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
    notes: list[str] = field(default_factory=list)  # what reading the source skipped or chose

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


def read_text(path: Path) -> str | None:
    """A file's text, or None for a binary file (NUL bytes or not UTF-8): never decoded with
    replacement characters, which would become training text."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class TextFiles:
    """The documents (relative name, text) of a text source, read one file at a time; binary
    files are skipped and named in `note` after each pass."""

    def __init__(self, source: str) -> None:
        self.source, self.files, self.skipped = source, text_files(source), []

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self.skipped = []
        for name, path in self.files:
            text = read_text(path)
            if text is None:
                self.skipped.append(name)
            else:
                yield name, text

    @property
    def note(self) -> str | None:
        if not self.skipped:
            return None
        shown = ", ".join(self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
        return (f"note: skipped {len(self.skipped)} binary file(s) in {self.source} (NUL bytes or not "
                f"UTF-8): {shown}")


@dataclass
class Documents:
    """A corpus as documents (key, text), read again on each pass so that a source larger than
    memory streams. `val` is the source's own validation split; None means split_stream splits
    the documents by a hash of their key."""

    source: str
    train: Iterable[tuple[str, str]]
    val: Iterable[tuple[str, str]] | None = None
    fixed_notes: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """What the entry points should say about the reading (valid after a pass)."""
        found = [getattr(part, "note", None) for part in (self.train, self.val)]
        return self.fixed_notes + [n for n in found if n]


def read_documents(source: str, text_field: str = "text") -> Documents:
    """The documents of `stdlib`, a text file or folder, or a dataset (tnt/hf_data.py)."""
    from tnt import hf_data  # it imports DataError from this module

    if source != "stdlib" and not source.startswith("hf:") and not Path(source).exists():
        raise DataError(f"data path {source!r} does not exist")
    if source != "stdlib" and hf_data.is_dataset_source(source):
        return hf_data.dataset_documents(source, text_field)
    return Documents(source, TextFiles(source))


def split_stream(docs: Documents, val_percent: float) -> Iterator[tuple[str, str]]:
    """("train" | "val", text) for every non-empty document, each split in source order.

    Without the source's own validation split, a document goes to val by a hash of its key
    (`is_val_file`); neither split is left empty (the last document of the other moves over), and
    a corpus of one document is split by position. Each split's last document is held back to
    decide that, so the stream needs one document of lookahead per split, never the corpus.
    """
    if docs.val is not None:
        count = 0
        for split, items in (("train", docs.train), ("val", docs.val)):
            for _, text in items:
                if text:
                    count += 1
                    yield split, text
        if not count:
            raise DataError(f"data path {docs.source!r} is empty (no text in any document)")
        return
    held: dict[str, str | None] = {"train": None, "val": None}
    count = 0
    for key, text in docs.train:
        if not text:
            continue
        split = "val" if is_val_file(key, val_percent) else "train"
        if held[split] is not None:
            yield split, held[split]
        held[split], count = text, count + 1
    if not count:
        raise DataError(f"data path {docs.source!r} is empty (no text in any document)")
    if count == 1:
        text = held["train"] if held["train"] is not None else held["val"]
        cut = int(len(text) * (1 - val_percent / 100))
        yield "train", text[:cut]
        yield "val", text[cut:]
    elif held["val"] is None:  # few documents: keep the split by document, never leave val empty
        yield "val", held["train"]
    elif held["train"] is None:
        yield "train", held["val"]
    else:
        yield "train", held["train"]
        yield "val", held["val"]


def collect_splits(docs: Documents, val_percent: float) -> tuple[list[str], list[str]]:
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split, text in split_stream(docs, val_percent):
        splits[split].append(text)
    return splits["train"], splits["val"]


def split_documents(source: str, val_percent: float, text_field: str = "text") -> tuple[list[str], list[str]]:
    """Texts of the train and val documents (split_stream), held in memory."""
    return collect_splits(read_documents(source, text_field), val_percent)


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """One stream: each document's tokens followed by eos."""
    if not texts:  # a dataset's own validation split may hold no text
        return np.zeros(0, token_dtype(tokenizer.vocab_size))
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
                bpe_vocab_size: int = 1024, text_field: str = "text") -> Corpus:
    """Load a corpus. `tokenizer` is a tokenizer object, "byte"/"bpe" to make one, or the path of
    a Hugging Face `tokenizer.json`; `text_field` is the column that holds a dataset's text.

    A prepared token folder carries its own tokenizer; passing a different one is an error.
    """
    if is_prepared(source):
        corpus = read_token_dir(source)
        if not isinstance(tokenizer, str) and tokenizer.spec != corpus.tokenizer.spec:
            raise DataError(f"token folder {source!r} was written with a different tokenizer "
                            f"({corpus.tokenizer.spec['kind']}, vocab "
                            f"{corpus.tokenizer.vocab_size}) than the run's ({tokenizer.spec['kind']},"
                            f" vocab {tokenizer.vocab_size})")
        return corpus
    docs = read_documents(source, text_field)
    train_texts, val_texts = collect_splits(docs, val_percent)
    if isinstance(tokenizer, str):
        tokenizer = make_tokenizer(tokenizer, train_texts, bpe_vocab_size)
    return Corpus(tokenizer, encode_documents(tokenizer, train_texts),
                  encode_documents(tokenizer, val_texts), source, text_bytes(train_texts),
                  text_bytes(val_texts), docs.notes())


def make_tokenizer(kind: str, train_texts: Iterable[str], bpe_vocab_size: int) -> Tokenizer:
    """The tokenizer named "byte", "bpe" (trained on `train_texts`, which may be a stream) or by a
    tokenizer.json path."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_texts, bpe_vocab_size)
    try:
        return BPETokenizer.from_file(kind)
    except Exception as e:  # OSError, or the bare Exception the tokenizers library raises
        raise DataError(f"tokenizer {kind!r} is not byte, bpe or a readable Hugging Face "
                        f"tokenizer.json: {e}") from e


class TokenDirWriter:
    """A token folder written a piece at a time: ids are appended to hidden temporary files, and
    `commit` renames them into place and writes meta.json last, so that a failed write leaves no
    half-written file under a final name. A tokenizer.json tokenizer is written as
    `tokenizer.json` beside meta.json, which names it."""

    def __init__(self, out: str | Path, tokenizer: Tokenizer, source: str) -> None:
        self.out, self.tokenizer, self.source = Path(out), tokenizer, source
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(tokenizer.vocab_size).newbyteorder("<")
        self.tokens, self.bytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
        self.files = {split: open(self._tmp(f"{split}.bin"), "wb") for split in SPLITS}

    def _tmp(self, name: str) -> Path:
        return self.out / f".{name}.tmp"

    def append(self, split: str, ids: np.ndarray, n_bytes: int) -> None:
        arr = np.ascontiguousarray(ids, dtype=self.dtype)
        arr.tofile(self.files[split])
        self.tokens[split] += int(arr.size)
        self.bytes[split] += int(n_bytes)

    def commit(self) -> Path:
        for f in self.files.values():
            f.close()
        spec = self.tokenizer.spec
        meta = {"format": "tnt-tokens-v1", "dtype": self.dtype.name, "source": self.source}
        if isinstance(self.tokenizer, BPETokenizer):
            self._tmp(TOKENIZER_FILE).write_text(spec["json"], encoding="utf-8")
            os.replace(self._tmp(TOKENIZER_FILE), self.out / TOKENIZER_FILE)
            spec = {"kind": spec["kind"], "vocab_size": spec["vocab_size"], "file": TOKENIZER_FILE}
        meta["tokenizer"] = spec
        for split in SPLITS:
            os.replace(self._tmp(f"{split}.bin"), self.out / f"{split}.bin")
            meta[f"{split}_tokens"] = self.tokens[split]
            meta[f"{split}_bytes"] = self.bytes[split]
        self._tmp(META_FILE).write_text(json.dumps(meta, indent=1))
        os.replace(self._tmp(META_FILE), self.out / META_FILE)
        return self.out

    def abort(self) -> None:
        """Remove the temporary files; whatever the folder held before stays as it was."""
        for split, f in self.files.items():
            f.close()
            self._tmp(f"{split}.bin").unlink(missing_ok=True)


def write_token_dir(corpus: Corpus, out: str | Path) -> Path:
    """Write `train.bin`, `val.bin` (raw little-endian ids) and `meta.json` atomically."""
    writer = TokenDirWriter(out, corpus.tokenizer, corpus.source)
    for split in SPLITS:
        writer.append(split, getattr(corpus, split), corpus.split_bytes(split))
    return writer.commit()


def read_token_dir(path: str | Path) -> Corpus:
    """A token folder, memory-mapped; its tokenizer from `tokenizer.json` when meta.json names
    one, else from the spec inside meta.json."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        spec = meta["tokenizer"]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path / META_FILE} is not a valid token folder description: {e}") from e
    if "file" in spec:
        try:
            spec = {"kind": spec["kind"], "vocab_size": spec["vocab_size"],
                    "json": (path / spec["file"]).read_text(encoding="utf-8")}
        except (OSError, KeyError, TypeError) as e:
            raise DataError(f"token folder {path}: cannot read its tokenizer file: {e}") from e
    try:
        tokenizer = tokenizer_from_spec(spec)
    except Exception as e:  # ValueError, or the bare Exception the tokenizers library raises
        raise DataError(f"token folder {path}: its tokenizer cannot be rebuilt: {e}") from e
    splits = {}
    for split in SPLITS:
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


def has_pad(batch: dict[str, np.ndarray], pad_id: int) -> bool:
    """Whether a batch's model inputs (`enc_tokens`, `dec_tokens`; labels are no input) hold a pad
    token, read on the host where the batch is built: a torch forward told False takes its
    unmasked fast path without reading the device to find out."""
    return any(bool(np.any(np.asarray(batch[k]) == pad_id)) for k in ("enc_tokens", "dec_tokens")
               if batch.get(k) is not None)


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
    """Training batches drawn at random offsets from (seed, step); eval batches in fixed order.

    A batch is a dict of int32 arrays (`BatchSpec.make`): encoder_decoder `enc_tokens` [B, enc_len],
    `dec_tokens` [B, seq_len] (bos, then the target shifted right) and `labels` [B, seq_len];
    decoder_only `dec_tokens` and `labels` [B, seq_len]. A custom loop builds them with

        corpus = load_corpus("stdlib")
        spec = BatchSpec("decoder_only", batch_size=16, seq_len=64, enc_len=0, bos_id=1)
        batch = Batches(spec, corpus.train, corpus.val, seed=0).train_batch(step)

    and saves its model with `tnt_jax.save_checkpoint` / `tnt_torch.save_checkpoint`.
    """

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
