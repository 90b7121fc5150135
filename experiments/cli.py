"""The `tnt` console command: `tnt COMMAND ARGS` runs `python -m experiments.COMMAND ARGS`.

Each command module is imported only when named, so `tnt prepare` starts without JAX or torch.
"""

from __future__ import annotations

import difflib
import importlib
import sys

COMMANDS = {
    "pretrain": "train a model (the default run needs no arguments)",
    "prepare": "tokenize a corpus into a token folder",
    "generate": "continue prompts with a trained model",
    "evaluate": "score a checkpoint on held-out text",
    "analyze": "plots and tables of a run's parameters and dynamics",
    "compare": "sweep learning rates, nGPT against the RMSNorm baseline",
    "plan": "compile a run ahead of time: memory and FLOPs per device",
    "export": "write a checkpoint as a Hugging Face folder that transformers loads",
    "bench": "train-step and matmul benchmarks (JSON)",
    "doctor": "framework versions and devices",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, about in COMMANDS.items()]
    return "usage: tnt COMMAND [ARGS]  (tnt COMMAND --help for its flags)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from tnt import __version__

        print(f"tnt {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(COMMANDS)}"
        print(f"error: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"experiments.{name}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
