"""Tokenize a corpus once into a memory-mapped token folder.

    python -m experiments.prepare --data PATH_OR_stdlib --out DIR [--tokenizer byte|bpe|PATH]
                                  [--workers N]

writes `DIR/train.bin`, `DIR/val.bin` (raw little-endian uint16/uint32 ids) and `DIR/meta.json`
(dtype, token and byte counts, tokenizer spec). `pretrain --data DIR` memory-maps the files, so a
corpus larger than RAM trains without being loaded. `--tokenizer PATH` takes a Hugging Face
`tokenizer.json` (e.g. GPT-2's).

Documents are encoded by `--workers` processes (default: one per CPU core) in groups of at most
about 1 MB, in order, with a progress bar over the bytes; each worker rebuilds the tokenizer from its
spec once. A corpus of one file is one document per split, so it uses one worker per split.
The result is the same token stream as `tnt.data.load_corpus` gives.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

import numpy as np
from tqdm import tqdm

from experiments.flags import Parser
from tnt.data import (
    Corpus,
    DataError,
    encode_documents,
    make_tokenizer,
    split_documents,
    token_dtype,
    write_token_dir,
)
from tnt.tokenizer import tokenizer_from_spec
from tnt.units import text_bytes

GROUP_BYTES = 1 << 20
_worker_tokenizer = None


def _init_worker(spec: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_spec(spec)


def _encode_group(texts: list[str]) -> np.ndarray:
    """The documents of one group, each followed by eos, in the worker's tokenizer."""
    return encode_documents(_worker_tokenizer, texts)


def groups(texts: list[str], size: int = GROUP_BYTES) -> list[list[str]]:
    out, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= size:
            out.append(cur)
            cur, n = [], 0
    return out + ([cur] if cur else [])


def encode_parallel(tokenizer, texts: list[str], workers: int, desc: str) -> np.ndarray:
    dtype = token_dtype(tokenizer.vocab_size)
    parts = []
    with tqdm(total=sum(len(t) for t in texts), desc=desc, unit="char", unit_scale=True,
              dynamic_ncols=True, mininterval=1.0) as bar:
        # groups of about 1 MB, smaller for a small corpus so that every worker gets some
        todo = groups(texts, max(1, min(GROUP_BYTES, sum(len(t) for t in texts) // (4 * workers))))
        if workers == 1 or len(todo) == 1:
            _init_worker(tokenizer.spec)
            results = map(_encode_group, todo)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(todo)), _init_worker, (tokenizer.spec,))
            results = pool.imap(_encode_group, todo)
        try:
            for group, ids in zip(todo, results, strict=True):
                parts.append(ids)
                bar.update(sum(len(t) for t in group))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def prepare(data: str, out: str, kind: str = "byte", val_percent: float = 5.0,
            bpe_vocab_size: int = 1024, workers: int | None = None) -> Corpus:
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    train_texts, val_texts = split_documents(data, val_percent)
    tokenizer = make_tokenizer(kind, train_texts, bpe_vocab_size)
    if getattr(tokenizer, "note", None):
        print(tokenizer.note)
    workers = workers or os.cpu_count() or 1
    corpus = Corpus(tokenizer, encode_parallel(tokenizer, train_texts, workers, "train"),
                    encode_parallel(tokenizer, val_texts, workers, "val"), data,
                    text_bytes(train_texts), text_bytes(val_texts))
    write_token_dir(corpus, out)
    return corpus


def main(argv=None) -> int:
    p = Parser(prog="python -m experiments.prepare", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="stdlib")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH")
    p.add_argument("--bpe-vocab-size", type=int, default=1024)
    p.add_argument("--val-percent", type=float, default=5.0)
    p.add_argument("--workers", type=int, help="encoding processes (default: one per CPU core)")
    args = p.parse_args(argv)
    try:
        corpus = prepare(args.data, args.out, args.tokenizer, args.val_percent,
                         args.bpe_vocab_size, args.workers)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out names a file, or a folder that cannot be written
        print(f"error: cannot write the token folder --out {args.out}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    print(f"wrote {len(corpus.train):,} train and {len(corpus.val):,} val tokens "
          f"({corpus.tokenizer.spec['kind']}, vocab {corpus.tokenizer.vocab_size}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
