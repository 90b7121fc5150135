"""Talk to a trained model: `python -m experiments.generate --ckpt RUN_DIR --prompt "def main("`.

`--ckpt` is a run directory, its `checkpoints` folder or one step folder, written by either
backend (`tnt.checkpoint_io` reads both layouts); `--backend` chooses the framework that runs it.
The tokenizer is the one saved in the checkpoint; `--tokenizer FILE` (a `tokenizer.json` of a BPE
run, or `byte`) is checked against it and refused if it differs.

    python -m experiments.generate --ckpt runs/my-run --prompt "import os" --max-new-tokens 64
    python -m experiments.generate --ckpt runs/my-run --backend torch --temperature 0.8 \\
        --top-p 0.95 --seed 1 --prompt "class " --prompt "def "
    python -m experiments.generate --ckpt runs/my-run --interactive

Greedy unless `--temperature` > 0. Several `--prompt`s decode as one batch; each output is
printed under a `=== prompt N: '...' ===` line. Each interactive prompt samples with a new seed
(`--seed`, then `--seed` + 1, ...). A prompt longer than
the model allows keeps its last tokens, and a note on stderr says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

from experiments.flags import Parser, add_threads_flag, apply_threads
from tnt.backend import BACKENDS, Backend, BackendUnavailable, backend
from tnt.checkpoint_meta import CheckpointError
from tnt.config import MAX_SEED, ConfigError
from tnt.generation import Sampling, TokenizerMismatch, check_tokenizer, check_tokenizer_spec
from tnt.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_from_spec


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.generate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoints dir or step dir")
    p.add_argument("--prompt", action="append", default=[],
                   help="text to answer or continue (repeatable: one batch)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin")
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 (default) is off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 (default) is off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole model for every token (the slow reference)")
    p.add_argument("--tokenizer", help="a tokenizer.json (BPE) or 'byte'; must match the "
                                       "checkpoint's")
    add_threads_flag(p)
    args = p.parse_args(argv)
    if not args.prompt and not args.interactive:
        p.error("give --prompt TEXT or --interactive")
    return args


def user_tokenizer(arg: str, meta: dict, where: str):
    """The `--tokenizer` the user named: any, for a checkpoint that carries none (imported
    weights), else refused unless it is the checkpoint's."""
    if arg == "byte":
        tok = ByteTokenizer()
    else:
        try:
            tok = BPETokenizer.from_json(Path(arg).read_text())
        except Exception as e:  # tokenizers raises its own exception types
            raise TokenizerMismatch(f"cannot read tokenizer {arg}: {e}") from e
    if tokenizer_from_spec(meta["tokenizer"]) is not None:
        check_tokenizer_spec(tok.spec, meta["tokenizer"], where)
    return tok


def answer(framework: Backend, model, tokenizer, prompts: list[str], args, sampling: Sampling) -> list[str]:
    out = framework.generate(model, [tokenizer.encode(p) for p in prompts], args.max_new_tokens, sampling,
                   use_cache=not args.no_cache, warn=False)
    for note in out.notices:
        print(f"note: {note}", file=sys.stderr)
    return [tokenizer.decode(ids) for ids in out.tokens]


def interactive_seed(seed: int, turn: int) -> int:
    """The seed of the `turn`-th interactive prompt: a new draw per prompt, the same session
    again for the same `--seed`."""
    return (seed + turn) % (MAX_SEED + 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        apply_threads(args)
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        b = backend(args.backend)
        loaded = b.load(args.ckpt)
        model, cfg, tokenizer = loaded.model, loaded.cfg, loaded.tokenizer
        if args.tokenizer:
            tokenizer = user_tokenizer(args.tokenizer, loaded.meta, f"checkpoint {args.ckpt}")
        if tokenizer is None:
            raise TokenizerMismatch(f"checkpoint {args.ckpt} carries no tokenizer (imported "
                                    f"weights); name one with --tokenizer FILE")
        check_tokenizer(tokenizer, cfg.model)
        if args.prompt:
            texts = answer(b, model, tokenizer, args.prompt, args, sampling)
            for i, (prompt, text) in enumerate(zip(args.prompt, texts, strict=True)):
                if len(texts) > 1:  # outputs may hold newlines: each goes under its prompt's header
                    print(f"{'' if i == 0 else chr(10)}=== prompt {i + 1}: {prompt!r} ===")
                print(text)
        if args.interactive:
            print(f"{cfg.model.arch} {cfg.model.norm} model, step {loaded.step}, "
                  f"{args.backend}; /quit or EOF ends.", file=sys.stderr)
            for turn in itertools.count():
                try:
                    line = input("> ")
                except EOFError:
                    break
                if line.strip() == "/quit":
                    break
                drawn = dataclasses.replace(sampling, seed=interactive_seed(args.seed, turn))
                print(answer(b, model, tokenizer, [line], args, drawn)[0], flush=True)
    except (CheckpointError, ConfigError, TokenizerMismatch, ValueError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
