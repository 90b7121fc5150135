"""The commands' argument parser: argparse's, with a suggestion for a mistyped flag; and the
`--threads` flag the commands share."""

from __future__ import annotations

import argparse
import difflib

from tnt.config import ConfigError
from tnt.threads import limit_threads


class Parser(argparse.ArgumentParser):
    """`--maxsteps 3` fails as in argparse, naming the flag it was probably meant to be."""

    def parse_args(self, args=None, namespace=None):
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            flags = [s for action in self._actions for s in action.option_strings]
            self.error("unrecognized arguments: " + " ".join(_with_hint(a, flags) for a in extra))
        return namespace


def _with_hint(arg: str, flags: list[str]) -> str:
    if not arg.startswith("-"):
        return arg
    close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.6)
    return f"{arg} (did you mean {close[0]}?)" if close else arg


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads the framework may use (default: every core this process may "
                        "run on); on a machine shared with other jobs give your share, e.g. 1: "
                        "more threads than free cores make every step wait (tnt/threads.py)")


def apply_threads(args: argparse.Namespace) -> None:
    """`limit_threads(args.threads)` when the flag was given, before a framework starts its
    thread pools; a bad count raises ConfigError (the commands' one `error:` line)."""
    if args.threads is not None:
        try:
            limit_threads(args.threads)
        except ValueError as e:
            raise ConfigError(str(e)) from None
