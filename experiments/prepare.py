"""Tokenize a corpus once into a memory-mapped token folder.

    python -m experiments.prepare --data PATH_OR_stdlib --out DIR [--tokenizer byte|bpe]

writes `DIR/train.bin`, `DIR/val.bin` (raw little-endian uint16/uint32 ids) and `DIR/meta.json`
(dtype, token counts, tokenizer spec). `pretrain --data DIR` memory-maps the files, so a corpus
larger than RAM trains without being loaded.
"""

from __future__ import annotations

import argparse
import sys

from tnt.data import DataError, load_corpus, write_token_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="stdlib")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    p.add_argument("--bpe-vocab-size", type=int, default=1024)
    p.add_argument("--val-percent", type=float, default=5.0)
    args = p.parse_args(argv)
    try:
        corpus = load_corpus(args.data, args.tokenizer, args.val_percent, args.bpe_vocab_size)
        out = write_token_dir(corpus, args.out)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out names a file, or a folder that cannot be written
        print(f"error: cannot write the token folder --out {args.out}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    print(f"wrote {len(corpus.train):,} train and {len(corpus.val):,} val tokens "
          f"({corpus.tokenizer.spec['kind']}, vocab {corpus.tokenizer.vocab_size}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
