"""Pretrain a TnT model: `python -m experiments.pretrain --backend jax` (no other argument needed).

The command line of `tnt.run.Run`: it builds the run config from a preset, the flags and
`--set`, and trains (or, with `--resume`, continues) the run in `--out`.

Run directory: `RUN_DIR/config.json`, `RUN_DIR/tb/` (TensorBoard events),
`RUN_DIR/checkpoints/<step>/`, and `RUN_DIR/tokenizer.json` for a BPE run.
"""

from __future__ import annotations

import argparse
import sys

from experiments.flags import Parser, add_threads_flag, apply_threads
from experiments.stopping import Stopped, stop_on_signals
from tnt.backend import BACKENDS, BackendUnavailable, Launch
from tnt.checkpoint_meta import CheckpointError, CheckpointWriteError
from tnt.config import PRESETS, ConfigError, build_run_config, parse_set, read_config_file
from tnt.data import DataError
from tnt.run import Diverged, Run

# Flags that map onto config fields (flag dest -> field).
FLAG_FIELDS = {"arch": "arch", "norm": "norm", "data": "data", "max_steps": "max_steps",
               "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "seed": "seed",
               "eval_every": "eval_every", "ckpt_every": "ckpt_every", "tokenizer": "tokenizer",
               "analysis_every": "analysis_every", "text_field": "text_field"}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.pretrain", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--config", metavar="FILE",
                   help="start from a config file: a run's config.json, or a JSON or YAML file of "
                        "fields; --preset, the flags and --set refine it")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="a named shape (default cpu; applied over --config when both are given)")
    p.add_argument("--arch", choices=["encoder_decoder", "decoder_only"])
    p.add_argument("--norm", choices=["ngpt", "rmsnorm"])
    p.add_argument("--data", help="stdlib (default), a text file or folder, a prepared token folder "
                                  "(python -m experiments.prepare), a dataset file or folder (parquet, "
                                  "jsonl, json, arrow, save_to_disk) or hf:OWNER/NAME[:CONFIG]")
    p.add_argument("--text-field", help="the dataset column that holds the text (text)")
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
    add_threads_flag(p)
    p.add_argument("--logger", default="tensorboard", metavar="tensorboard,wandb",
                   help="where the scalars go, comma-separated (default tensorboard; wandb needs "
                        "the 'wandb' extra and writes RUN_DIR/wandb/, offline with WANDB_MODE=offline)")
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
        return Run.resume(args.out, args.backend, explicit_overrides(args), args.set, launch=launch,
                          loggers=args.logger)
    if args.config and args.resume:
        raise ConfigError("--config starts a new run; --resume takes the run's own config")
    base = read_config_file(args.config) if args.config else None
    cfg = build_run_config(args.preset or "cpu", explicit_overrides(args), args.set, base=base)
    vocab_explicit = "vocab_size" in dict(parse_set(s) for s in args.set)
    return Run(cfg, args.out, args.backend, keep_vocab_size=vocab_explicit, launch=launch,
               loggers=args.logger)


EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE_FAILED = 2, 3, 4


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one `error:` line; nothing written is changed),
    3 training diverged (one `error:` line naming the step to resume from), 4 a file could not be
    written (a full disk: the committed checkpoints are intact), 130 Ctrl-C and 143 SIGTERM (one
    `error:` line naming the step to resume from)."""
    args = parse_args(argv)
    run = None
    try:
        apply_threads(args)
        with stop_on_signals():
            run = make_run(args)
            run.fit()
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except (ConfigError, DataError, CheckpointError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as e:  # e.g. the disk filled up while writing TensorBoard events
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; the committed checkpoints are intact (continue "
              f"with --resume)", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except Stopped as e:  # the run's `finally` let a save in flight commit
        print(f"error: {e.message(run.out if run is not None else None)}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
