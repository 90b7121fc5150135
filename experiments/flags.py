"""The commands' argument parser: argparse's, with a suggestion for a mistyped flag."""

from __future__ import annotations

import argparse
import difflib


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
