"""Share a run with `transformers`: `python -m experiments.export RUN --out DIR`.

RUN is a run dir, its `checkpoints` folder or one step folder of either backend (read through
`tnt.checkpoint_io`, no framework needed). DIR becomes a Hugging Face model folder
(`tnt.hf_export`): decoder-only models load with `AutoModelForCausalLM`, encoder-decoder ones with
`AutoModelForSeq2SeqLM`, both with `trust_remote_code=True` (the modeling file imports
`tnt_torch`, so TnT must be installed where it is loaded), and the tokenizer with `AutoTokenizer`:

    python -m experiments.export runs/my-run --out exported/my-run
    lm_eval --model hf --model_args pretrained=exported/my-run,trust_remote_code=True --tasks ...

Both frameworks' `load_checkpoint` read DIR back as the checkpoint it came from. DIR must be new
or empty. Needs the `hf` extra (`pip install 'tnt[hf]'`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from experiments.flags import Parser
from tnt.checkpoint_io import read_canonical
from tnt.checkpoint_meta import CheckpointError
from tnt.config import ConfigError
from tnt.hf_export import TOKENIZER, write_export


def modeling_source() -> Path:
    """`tnt_torch/hf.py`, located without importing torch."""
    spec = importlib.util.find_spec("tnt_torch")
    return Path(next(iter(spec.submodule_search_locations))) / "hf.py"


def export(run: str | Path, out: str | Path) -> Path:
    """Write the newest readable checkpoint under `run` as a Hugging Face folder `out`."""
    params, meta = read_canonical(run)
    return write_export(out, params, meta, modeling_source())


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir, checkpoints dir or step dir (either backend)")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write (new or empty)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        print("error: experiments.export writes a folder for transformers, which is not "
              "installed: pip install 'tnt[hf]'", file=sys.stderr)
        return 2
    try:
        out = export(args.run, args.out)
    except (CheckpointError, ConfigError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (out / TOKENIZER).exists():
        print(f"note: {args.run} carries no tokenizer (imported weights): no tokenizer files were "
              f"written; add the source's tokenizer.json to {out} yourself", file=sys.stderr)
    print(f"exported {args.run} to {out}; load it with transformers' from_pretrained({str(out)!r}, "
          f"trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
