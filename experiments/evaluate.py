"""Score a checkpoint on held-out text: `python -m experiments.evaluate RUN --data PATH`.

RUN is a run directory, its `checkpoints` folder or one step folder written by either backend;
`--backend` picks the framework that computes the loss (default: the one that wrote it; both give
the same number). `--data` is a text file or folder, all of which is scored (it is the held-out
text: nothing is split off), or a token folder from `experiments.prepare`, whose `--split` (val)
is scored and whose tokenizer must be the checkpoint's.

The loss is the token-weighted mean cross-entropy of the run's objective (docs/design.md) over
`--batches` batches of windows spread evenly over the token stream, in nats per token; bits per
token and bits per byte follow (tnt/units.py: bytes are counted from the text, so byte and BPE
runs compare). Prints one line, or the JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments.flags import Parser
from tnt.backend import BACKENDS, BackendUnavailable
from tnt.backend import backend as backend_module
from tnt.checkpoint_io import newest_readable
from tnt.checkpoint_meta import CheckpointError
from tnt.data import (
    Batches,
    DataError,
    encode_documents,
    is_prepared,
    make_tokenizer,
    read_text,
    read_token_dir,
    text_files,
)
from tnt.generation import TokenizerMismatch, check_tokenizer
from tnt.run import batch_spec
from tnt.special_ids import SpecialIdCollision
from tnt.tokenizer import same_tokenizer
from tnt.units import bits_per_byte, bits_per_token, text_bytes


def held_out_stream(data: str, tokenizer, split: str = "val") -> tuple[np.ndarray, int]:
    """(token stream, bytes of text behind it) of a text path or a token folder's split."""
    if is_prepared(data):
        corpus = read_token_dir(data)
        if not same_tokenizer(corpus.tokenizer.spec, tokenizer.spec):
            raise DataError(f"token folder {data!r} was written with another tokenizer "
                            f"({corpus.tokenizer.spec['kind']}, vocab {corpus.tokenizer.vocab_size}) "
                            f"than the checkpoint's ({tokenizer.spec['kind']}, vocab "
                            f"{tokenizer.vocab_size}); prepare it with the run's tokenizer")
        return getattr(corpus, split), corpus.split_bytes(split)
    texts = [t for t in (read_text(p) for _, p in text_files(data)) if t]
    if not texts:
        raise DataError(f"data path {data!r} has no text to evaluate on")
    return encode_documents(tokenizer, texts), text_bytes(texts)


def evaluate(path: str | Path, data: str, backend: str | None = None, batches: int = 32,
             split: str = "val", tokenizer: str | None = None) -> dict:
    """Loss (nats/token), bits per token and per byte of a checkpoint on held-out data.
    `tokenizer` ("byte" or a tokenizer.json) is for a checkpoint that carries none (imported
    weights); for one that does, it must be the same."""
    if batches < 1:
        raise DataError(f"--batches must be >= 1, got {batches}")
    if backend is not None:
        backend_module(backend)  # an unknown or missing framework fails before any reading

    def load(step_dir: Path, kind: str):  # the newest checkpoint that loads (a warning if older)
        return backend_module(backend or kind).load(step_dir), step_dir, kind

    loaded, step_dir, kind = newest_readable(path, load)
    backend = backend or kind
    score = backend_module(backend).token_sums(loaded.model, loaded.cfg)
    cfg, tok = loaded.cfg, loaded.tokenizer
    if tokenizer == "bpe":
        raise DataError("--tokenizer bpe would train a new vocabulary; name the run's tokenizer.json")
    if tokenizer is not None:
        given = make_tokenizer(tokenizer, [], 0)
        if tok is not None and not same_tokenizer(given.spec, tok.spec):
            raise DataError(f"tokenizer {tokenizer!r} ({given.spec['kind']}, vocab {given.vocab_size}) is "
                            f"not the one checkpoint {step_dir} was trained with ({tok.spec['kind']}, "
                            f"vocab {tok.vocab_size})")
        tok = given
    if tok is None:
        raise CheckpointError(f"checkpoint {step_dir} carries no tokenizer (imported weights); "
                              f"name one with --tokenizer")
    try:  # a named tokenizer must fit the model (ids in range, the model's special ids)
        check_tokenizer(tok, cfg.model)
    except TokenizerMismatch as e:
        raise DataError(f"tokenizer {tokenizer!r}: {e}") from e
    stream, n_bytes = held_out_stream(data, tok, split)
    if n_bytes == 0:
        raise DataError(f"data {data!r} ({split}) has no text to evaluate on")
    windows = Batches(batch_spec(cfg), stream, stream, cfg.train.seed)
    total, count = 0.0, 0
    for batch in windows.eval_batches(batches):
        s, c = score(batch)
        total, count = total + s, count + c
    loss = total / max(count, 1)
    return {"checkpoint": str(step_dir), "step": int(step_dir.name), "written_by": kind,
            "backend": backend, "data": str(data), "loss": loss, "bits_per_token": bits_per_token(loss),
            "bits_per_byte": bits_per_byte(loss, len(stream), n_bytes), "tokens_scored": count,
            "stream_tokens": int(len(stream)), "stream_bytes": int(n_bytes)}


def describe(r: dict) -> str:
    return (f"{r['checkpoint']} on {r['data']}: loss {r['loss']:.4f} nats/token, "
            f"{r['bits_per_token']:.4f} bits/token, {r['bits_per_byte']:.4f} bits/byte "
            f"({r['tokens_scored']:,} tokens scored; {r['stream_bytes']:,} bytes in "
            f"{r['stream_tokens']:,} tokens; {r['backend']})")


def main(argv=None) -> int:
    p = Parser(prog="python -m experiments.evaluate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir, its checkpoints folder or a step folder (either backend)")
    p.add_argument("--data", required=True, help="text file or folder, or a prepared token folder")
    p.add_argument("--backend", choices=BACKENDS, help="framework that computes the loss "
                                                       "(default: the checkpoint's)")
    p.add_argument("--batches", type=int, default=32, help="batches of windows to score (32)")
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="which split of a token folder to score (val)")
    p.add_argument("--tokenizer", metavar="byte|PATH", help="for a checkpoint without one "
                   "(imported weights); otherwise it must be the checkpoint's")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        r = evaluate(args.run, args.data, args.backend, args.batches, args.split, args.tokenizer)
    except (CheckpointError, DataError, BackendUnavailable, SpecialIdCollision) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if args.json else describe(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
