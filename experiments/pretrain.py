"""Pretrain a TnT model: `python -m experiments.pretrain --backend jax` (no other argument needed).

The command line of `tnt.run.Run`: it builds the run config from a preset, the flags and
`--set`, and trains (or, with `--resume`, continues) the run in `--out`.

Run directory: `RUN_DIR/config.json`, `RUN_DIR/tb/` (TensorBoard events),
`RUN_DIR/checkpoints/<step>/`, and `RUN_DIR/tokenizer.json` for a BPE run.
"""

from __future__ import annotations

import argparse
import sys

from experiments.flags import Parser
from tnt.backend import BACKENDS, BackendUnavailable, Launch
from tnt.checkpoint_meta import CheckpointError
from tnt.config import PRESETS, ConfigError, build_run_config, parse_set
from tnt.data import DataError
from tnt.run import Diverged, Run

# Flags that map onto config fields (flag dest -> field).
FLAG_FIELDS = {"arch": "arch", "norm": "norm", "data": "data", "max_steps": "max_steps",
               "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "seed": "seed",
               "eval_every": "eval_every", "ckpt_every": "ckpt_every", "tokenizer": "tokenizer",
               "analysis_every": "analysis_every"}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.pretrain", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--arch", choices=["encoder_decoder", "decoder_only"])
    p.add_argument("--norm", choices=["ngpt", "rmsnorm"])
    p.add_argument("--data", help="stdlib (default), a text file or folder, or a prepared "
                                  "token folder (python -m experiments.prepare)")
    p.add_argument("--tokenizer", metavar="byte|bpe|PATH",
                   help="byte (default), a BPE trained on the train split, or a Hugging Face "
                        "tokenizer.json (its special ids become pad/bos/eos)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--analysis-every", type=int, help="TensorBoard dynamics interval "
                   "(alphas, scalers, condition numbers; tnt/dynamics.py); 0 disables")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set d_model=256 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<backend>-<arch>-<norm>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint")
    p.add_argument("--mesh", help="jax device mesh, e.g. data=2,fsdp=4,tensor=1 (axes left out "
                                  "are 1; data takes the remaining devices; default: all on data)")
    p.add_argument("--coordinator", help="jax multi-host: address:port of process 0 "
                                         "(or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="jax multi-host: number of processes "
                                                     "(or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="jax multi-host: this process's index "
                                                  "(or JAX_PROCESS_ID)")
    return p.parse_args(argv)


def explicit_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {field: getattr(args, dest) for dest, field in FLAG_FIELDS.items()
            if getattr(args, dest) is not None}


def make_run(args: argparse.Namespace) -> Run:
    """The run the flags describe (nothing is read or written yet)."""
    launch = Launch(args.mesh, args.coordinator, args.num_processes, args.process_id)
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        return Run.resume(args.out, args.backend, explicit_overrides(args), args.set, launch=launch)
    cfg = build_run_config(args.preset, explicit_overrides(args), args.set)
    vocab_explicit = "vocab_size" in dict(parse_set(s) for s in args.set)
    return Run(cfg, args.out, args.backend, keep_vocab_size=vocab_explicit, launch=launch)


EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one `error:` line; nothing written is changed),
    3 training diverged (one `error:` line naming the step to resume from)."""
    args = parse_args(argv)
    try:
        make_run(args).fit()
    except (ConfigError, DataError, CheckpointError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
