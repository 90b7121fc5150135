"""Score a checkpoint on held-out text: `python -m experiments.evaluate RUN --data PATH`.

RUN is a run directory, its `checkpoints` folder or one step folder written by either backend;
`--backend` picks the framework that computes the loss (default: the one that wrote it; both give
the same number). `--data` is a text file or folder, all of which is scored (it is the held-out
text: nothing is split off; binary files are skipped), a dataset (tnt/hf_data.py; column
`--text-field`, by default the run's), all of it scored unless it has its own validation split, in
which case `--split` (val) picks that split or train, or a token folder from `experiments.prepare`,
whose `--split` is scored and whose tokenizer must be the checkpoint's.

The loss is the token-weighted mean cross-entropy of the run's objective (docs/design.md) over
`--batches` batches of windows spread evenly over the token stream, in nats per token; bits per
token and bits per byte follow (tnt/units.py: bytes are counted from the text, so byte and BPE
runs compare). Prints one line, or the JSON with `--json`.

`--tasks T1,T2` also runs lm-evaluation-harness tasks (the `eval` extra) on the checkpoint through
the harness model `tnt` (tnt/lm_eval_model.py) and prints the harness's table; `--json` then
holds a "tasks" entry: each task's metrics (`acc`, `acc_stderr`, ...). `--data` may then be
left out. The harness's own tasks download their data from the Hugging Face Hub; offline, give
local tasks with `--include-path DIR` (a YAML with `dataset_path: json` and a jsonl each) and set
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments.flags import Parser, add_threads_flag, apply_threads
from tnt.backend import BACKENDS, BackendUnavailable
from tnt.backend import backend as backend_module
from tnt.checkpoint_io import newest_readable
from tnt.checkpoint_meta import CheckpointError
from tnt.config import ConfigError
from tnt.data import (
    Batches,
    DataError,
    encode_documents,
    is_prepared,
    make_tokenizer,
    read_documents,
    read_token_dir,
)
from tnt.generation import TokenizerMismatch, check_tokenizer
from tnt.harness import HarnessError
from tnt.run import batch_spec
from tnt.special_ids import SpecialIdCollision
from tnt.tokenizer import same_tokenizer
from tnt.units import bits_per_byte, bits_per_token, text_bytes


def held_out_stream(data: str, tokenizer, split: str | None = None,
                    text_field: str = "text") -> tuple[np.ndarray, int, list[str]]:
    """(token stream, bytes of text behind it, notes on the reading) of a text path (all of it), a
    dataset (its validation split when it has one) or a token folder's split (val unless `split`
    names another)."""
    if split not in (None, "val", "train"):
        raise DataError(f"--split must be val or train, got {split!r}")
    if is_prepared(data):
        split = split or "val"
        corpus = read_token_dir(data)
        if not same_tokenizer(corpus.tokenizer.spec, tokenizer.spec):
            raise DataError(f"token folder {data!r} was written with another tokenizer "
                            f"({corpus.tokenizer.spec['kind']}, vocab {corpus.tokenizer.vocab_size}) "
                            f"than the checkpoint's ({tokenizer.spec['kind']}, vocab "
                            f"{tokenizer.vocab_size}); prepare it with the run's tokenizer")
        return getattr(corpus, split), corpus.split_bytes(split), []
    docs = read_documents(data, text_field)
    if docs.val is None and split is not None:
        raise DataError(f"--split {split} applies to a prepared token folder or a dataset with a "
                        f"validation split; the text at {data!r} is scored whole (it is the "
                        f"held-out text), so leave --split out")
    scored = docs.val if docs.val is not None and split != "train" else docs.train
    texts = [t for _, t in scored if t]
    if not texts:
        raise DataError(f"data path {data!r} has no text to evaluate on")
    return encode_documents(tokenizer, texts), text_bytes(texts), docs.notes()


def evaluate(path: str | Path, data: str, backend: str | None = None, batches: int = 32,
             split: str | None = None, tokenizer: str | None = None,
             text_field: str | None = None) -> dict:
    """Loss (nats/token), bits per token and per byte of a checkpoint on held-out data.
    `tokenizer` ("byte" or a tokenizer.json) is for a checkpoint that carries none (imported
    weights); for one that does, it must be the same. `text_field` defaults to the run's."""
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
    stream, n_bytes, notes = held_out_stream(data, tok, split, text_field or cfg.train.text_field)
    if n_bytes == 0:
        raise DataError(f"data {data!r} ({split or 'all'}) has no text to evaluate on")
    spec = batch_spec(cfg)
    if len(stream) < spec.window:  # the window is the checkpoint's: no flag here changes it
        raise DataError(f"data {data!r} has {len(stream)} tokens, fewer than one window of the "
                        f"checkpoint's {spec.window} tokens (its seq_len {spec.seq_len}"
                        + (f" + enc_len {spec.enc_len}" if spec.arch == "encoder_decoder" else " + 1")
                        + "); score more text")
    windows = Batches(spec, stream, stream, cfg.train.seed)
    total, count = 0.0, 0
    for batch in windows.eval_batches(batches):
        s, c = score(batch)
        total, count = total + s, count + c
    loss = total / max(count, 1)
    return {"checkpoint": str(step_dir), "step": int(step_dir.name), "written_by": kind,
            "backend": backend, "data": str(data), "loss": loss, "bits_per_token": bits_per_token(loss),
            "bits_per_byte": bits_per_byte(loss, len(stream), n_bytes), "tokens_scored": count,
            "stream_tokens": int(len(stream)), "stream_bytes": int(n_bytes), "notes": notes}


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm_eval's task index for `tasks`, refusing an unknown one (or a missing `eval` extra)."""
    try:
        from tnt.lm_eval_model import task_manager
    except ImportError as e:
        raise BackendUnavailable(f"--tasks needs lm-evaluation-harness, the 'eval' extra ({e.name} "
                                 f"is missing): pip install 'tnt[eval]'") from e
    return task_manager(tasks, include_path)


def downstream(path: str | Path, tasks: list[str], backend: str | None = None, limit: float | None = None,
               num_fewshot: int | None = None, include_path: str | None = None,
               batch_size: int = 16, manager=None) -> dict:
    """lm-evaluation-harness `tasks` on a checkpoint: {"tasks": metrics per task, "table": text}."""
    manager = manager or task_manager(tasks, include_path)  # an unknown task is refused first
    from tnt.lm_eval_model import TnTLM, run_tasks

    lm = TnTLM(run=str(path), backend=backend, batch_size=batch_size)
    return run_tasks(lm, tasks, limit, num_fewshot, include_path, manager)


def describe(r: dict) -> str:
    return (f"{r['checkpoint']} on {r['data']}: loss {r['loss']:.4f} nats/token, "
            f"{r['bits_per_token']:.4f} bits/token, {r['bits_per_byte']:.4f} bits/byte "
            f"({r['tokens_scored']:,} tokens scored; {r['stream_bytes']:,} bytes in "
            f"{r['stream_tokens']:,} tokens; {r['backend']})")


def main(argv=None) -> int:
    p = Parser(prog="python -m experiments.evaluate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir, its checkpoints folder or a step folder (either backend)")
    p.add_argument("--data", help="text file or folder, a dataset (file, folder or "
                                  "hf:OWNER/NAME[:CONFIG]) or a prepared token folder")
    p.add_argument("--text-field", help="the dataset column that holds the text (default: the run's)")
    p.add_argument("--backend", choices=BACKENDS, help="framework that computes the loss "
                                                       "(default: the checkpoint's)")
    p.add_argument("--batches", type=int, default=32, help="batches of windows to score (32)")
    p.add_argument("--split", choices=["val", "train"],
                   help="which split of a token folder or of a dataset with a validation split "
                        "to score (default val; a text path is scored whole)")
    p.add_argument("--tokenizer", metavar="byte|PATH", help="for a checkpoint without one "
                   "(imported weights); otherwise it must be the checkpoint's")
    p.add_argument("--tasks", metavar="T1,T2", help="lm-evaluation-harness tasks to run (extra 'eval'; "
                   "the harness's tasks download data: offline, use --include-path)")
    p.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per task (the task's default)")
    p.add_argument("--include-path", metavar="DIR", help="folder of local task YAML files")
    p.add_argument("--batch-size", type=int, default=16, help="harness requests per model call (16)")
    p.add_argument("--json", action="store_true")
    add_threads_flag(p)
    args = p.parse_args(argv)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.data is None and not tasks:
        print("error: give --data (held-out text to score), --tasks (harness tasks) or both",
              file=sys.stderr)
        return 2
    try:
        apply_threads(args)
        r = {}
        if args.data is not None:
            r = evaluate(args.run, args.data, args.backend, args.batches, args.split, args.tokenizer,
                         args.text_field)
            for note in r["notes"]:
                print(note, file=sys.stderr if args.json else sys.stdout)
        if tasks:
            found = downstream(args.run, tasks, args.backend, args.limit, args.num_fewshot,
                               args.include_path, args.batch_size)
            r["tasks"] = found["tasks"]
    except (CheckpointError, ConfigError, DataError, BackendUnavailable, SpecialIdCollision,
            HarnessError, TokenizerMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        if args.data is not None:
            print(describe(r))
        if tasks:
            print(found["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
