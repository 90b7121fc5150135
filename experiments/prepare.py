"""Tokenize a corpus once into a memory-mapped token folder, streaming it.

    python -m experiments.prepare --data SOURCE --out DIR [--tokenizer byte|bpe|PATH]
                                  [--text-field text] [--workers N] [--buffer-mb 64]

SOURCE is `stdlib`, a text file or folder, a dataset (`.parquet`, `.jsonl`/`.json`, `.arrow`, a
folder of them, a `save_to_disk` folder, or `hf:OWNER/NAME[:CONFIG]`; read through `datasets`,
column `--text-field`). Writes `DIR/train.bin`, `DIR/val.bin` (raw little-endian uint16/uint32
ids), `DIR/meta.json` (dtype, token and byte counts, tokenizer) and, for a BPE or `tokenizer.json`
tokenizer, `DIR/tokenizer.json`. `pretrain --data DIR` memory-maps the files, so a corpus larger
than RAM trains without being loaded.

The source is read as a stream: documents collect in a buffer of about `--buffer-mb` million
characters, which `--workers` processes (default: one per CPU core) encode in groups, in order,
while a progress bar counts the characters; the ids are appended to the folder's files. Memory
stays bounded by the buffer (and the largest document), whatever the corpus size. `--tokenizer
bpe` reads the train documents once more, first, to train the vocabulary. The result is the same
token stream as `tnt.data.load_corpus` gives.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from experiments.flags import Parser
from tnt.data import (
    SPLITS,
    Corpus,
    DataError,
    TokenDirWriter,
    encode_documents,
    make_tokenizer,
    read_documents,
    read_token_dir,
    split_stream,
)
from tnt.tokenizer import Tokenizer, tokenizer_from_spec
from tnt.units import text_bytes

GROUP_CHARS = 1 << 20
BUFFER_CHARS = 64 << 20
RUN_MARKERS = ("config.json", "checkpoints", ".lock")  # what makes a folder a pretrain run
_worker_tokenizer = None


def _init_worker(spec: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_spec(spec)


def _encode_group(texts: list[str]) -> np.ndarray:
    """The documents of one group, each followed by eos, in the worker's tokenizer."""
    return encode_documents(_worker_tokenizer, texts)


def groups(texts: list[str], size: int = GROUP_CHARS) -> list[list[str]]:
    out, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= size:
            out.append(cur)
            cur, n = [], 0
    return out + ([cur] if cur else [])


class Encoder:
    """Encodes buffers of documents in order with `workers` processes (started on the first
    buffer that splits into more than one group, kept for the rest)."""

    def __init__(self, tokenizer: Tokenizer, workers: int, bar: tqdm) -> None:
        self.tokenizer, self.workers, self.bar, self.pool = tokenizer, workers, bar, None

    def encode(self, texts: list[str]) -> np.ndarray:
        # groups of about 1M characters, smaller for a small buffer so that every worker gets some
        todo = groups(texts, max(1, min(GROUP_CHARS, sum(map(len, texts)) // (4 * self.workers))))
        if self.workers > 1 and len(todo) > 1 and self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(
                self.workers, _init_worker, (self.tokenizer.spec,))
        if self.pool is None:
            results = (encode_documents(self.tokenizer, group) for group in todo)
        else:
            results = self.pool.imap(_encode_group, todo)
        parts = []
        for group, ids in zip(todo, results, strict=True):
            parts.append(ids)
            self.bar.update(sum(map(len, group)))
        return np.concatenate(parts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def prepare(data: str, out: str, kind: str = "byte", val_percent: float = 5.0,
            bpe_vocab_size: int = 1024, workers: int | None = None, text_field: str = "text",
            buffer_chars: int = BUFFER_CHARS) -> Corpus:
    """Stream `data` into the token folder `out` (see the module docstring); the folder's corpus."""
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if buffer_chars < 1:
        raise DataError(f"the buffer must hold at least 1 character, got {buffer_chars}")
    docs = read_documents(data, text_field)
    train_texts = (text for split, text in split_stream(docs, val_percent) if split == "train")
    tokenizer = make_tokenizer(kind, train_texts, bpe_vocab_size)
    if getattr(tokenizer, "note", None):
        print(tokenizer.note)
    writer = TokenDirWriter(out, tokenizer, data)
    with tqdm(desc="encode", unit="char", unit_scale=True, dynamic_ncols=True, mininterval=1.0) as bar:
        encoder = Encoder(tokenizer, workers or os.cpu_count() or 1, bar)
        try:
            buffers: dict[str, list[str]] = {split: [] for split in SPLITS}
            held = 0
            for split, text in split_stream(docs, val_percent):
                buffers[split].append(text)
                held += len(text)
                if held >= buffer_chars:
                    _flush(buffers, encoder, writer)
                    held = 0
            _flush(buffers, encoder, writer)
        except BaseException:
            writer.abort()
            raise
        finally:
            encoder.close()
    corpus = read_token_dir(writer.commit())
    corpus.notes = docs.notes()
    return corpus


def _flush(buffers: dict[str, list[str]], encoder: Encoder, writer: TokenDirWriter) -> None:
    for split, texts in buffers.items():
        if texts:
            writer.append(split, encoder.encode(texts), text_bytes(texts))
            texts.clear()
    encoder.bar.set_postfix_str(f"train {writer.tokens['train']:,} val {writer.tokens['val']:,} tokens")


def check_out(out: str) -> None:
    """Refuse an `--out` that cannot become a token folder before any work: empty, a file, a
    pretrain run folder (its files would mix), or a place that takes no files. Nothing is
    created: the probe is an anonymous temporary file in the nearest existing folder."""
    if not out.strip():
        raise DataError("--out is empty; name the token folder to write")
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {out} is a file, not a token folder")
    if any((path / name).exists() for name in RUN_MARKERS):
        raise DataError(f"--out {out} is a pretrain run folder; write the tokens to a folder of "
                        f"their own (e.g. {path / 'tokens'})")
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise DataError(f"cannot write the token folder --out {out}: {e.strerror or e}") from e


def main(argv=None) -> int:
    p = Parser(prog="python -m experiments.prepare", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="stdlib", help="stdlib, a text file or folder, a dataset file or "
                   "folder (parquet, jsonl, json, arrow, save_to_disk) or hf:OWNER/NAME[:CONFIG]")
    p.add_argument("--text-field", default="text", help="the dataset column that holds the text (text)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH")
    p.add_argument("--bpe-vocab-size", type=int, default=1024)
    p.add_argument("--val-percent", type=float, default=5.0)
    p.add_argument("--workers", type=int, help="encoding processes (default: one per CPU core)")
    p.add_argument("--buffer-mb", type=float, default=BUFFER_CHARS / 2**20,
                   help="characters held before they are encoded, in units of 2**20 (64)")
    args = p.parse_args(argv)
    try:
        check_out(args.out)
        if not 0 < args.val_percent < 100:  # also nan
            raise DataError(f"--val-percent must be in (0, 100), got {args.val_percent}")
        corpus = prepare(args.data, args.out, args.tokenizer, args.val_percent,
                         args.bpe_vocab_size, args.workers, args.text_field, int(args.buffer_mb * 2**20))
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out names a file, or a folder that cannot be written
        print(f"error: cannot write the token folder --out {args.out}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    for note in corpus.notes:
        print(note)
    print(f"wrote {len(corpus.train):,} train and {len(corpus.val):,} val tokens "
          f"({corpus.tokenizer.spec['kind']}, vocab {corpus.tokenizer.vocab_size}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
