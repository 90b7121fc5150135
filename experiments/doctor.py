"""Which devices do the frameworks see? `python -m experiments.doctor [--json]`.

Prints JAX's and torch's versions and devices and warns when one framework sees an accelerator
and the other does not: the usual cause is an install that brought only one framework's GPU build
(`pip install -e ".[dev,cuda]"` brings JAX's CUDA plugin; torch's CUDA build comes from the
PyTorch wheel index, see docs/install.md). Then that framework silently trains on the CPU and the
GPU parity tests skip. Exit code 1 when there is a warning, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from experiments import acceptance
from experiments.flags import Parser
from tnt.backend import BACKENDS, backend


def info(name: str) -> dict:
    """Version, devices and whether one is an accelerator, as backend `name` sees them."""
    return backend(name).devices()


def warnings_for(jax: dict, torch: dict) -> list[str]:
    """A line for each framework that trains on the CPU while the other has an accelerator."""
    out = []
    for seen, blind, fix in ((jax, torch, "install torch's CUDA build (docs/install.md)"),
                             (torch, jax, 'pip install -e ".[cuda]" (JAX\'s CUDA plugin)')):
        if seen["accelerator"] and not blind["accelerator"]:
            out.append(f"{seen['framework']} sees {', '.join(seen['devices'])} but "
                       f"{blind['framework']} {blind['version']} sees only the CPU: {fix}")
    return out


def _safely(framework: str) -> dict:
    """`info(framework)`, or what it raised: a framework that cannot list its devices (a broken
    CUDA install, `JAX_PLATFORMS` naming a missing platform, no install) is what the doctor is
    for."""
    try:
        return info(framework)
    except Exception as e:  # whatever the framework raises while initializing
        return {"framework": framework, "version": "?", "devices": [f"error: {e}"],
                "accelerator": False, "error": f"{type(e).__name__}: {e}"}


def describe_parity(row: dict) -> str:
    """One line of the parity table (`experiments.parity.run_case`'s row)."""
    d, t = row["max_abs_diff"], row["tolerance"]
    worst = ", ".join(f"{k} {d[k]:.1e} (tol {t[k]:.1e})" for k in d)
    return f"parity {row['case']:<21} {row['device']} {row['steps']} steps: {worst}: " + (
        "pass" if row["pass"] else "FAIL")


def main(argv=None) -> int:
    p = Parser(prog="python -m experiments.doctor", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--full", action="store_true",
                   help="also compare the frameworks in float32 (experiments.parity) and train each: "
                        "tokens/s, MFU, predicted and measured peak memory, remat's saving "
                        "(experiments.acceptance; on the CPU tiny shapes, a 1024 matmul peak, remat "
                        "none only, one parity case)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case with --full")
    p.add_argument("--parity-steps", type=int, default=3,
                   help="train steps of each parity case with --full")
    args = p.parse_args(argv)
    if args.full and min(args.steps, args.parity_steps) < 1:
        p.error("--steps and --parity-steps must be at least 1")
    infos = [_safely(name) for name in BACKENDS]
    warnings = warnings_for(*infos) + [f"{i['framework']} failed: {i['error']}"
                                       for i in infos if "error" in i]
    full = parity_rows = None
    if args.full:
        if not any("error" in i for i in infos):
            from experiments import parity  # imports both frameworks, which may be broken

            # both on the GPU when both see one, else both on the CPU: the same device for each
            parity_rows = parity.check("gpu" if all(i["accelerator"] for i in infos) else "cpu",
                                       args.parity_steps)
            warnings += [f"parity case {r['case']} failed: {describe_parity(r)}"
                         for r in parity_rows if not r["pass"]]
        full = [row for i in infos if "error" not in i
                for row in acceptance.check(i["framework"], args.steps)]
    if args.json:
        print(json.dumps({"frameworks": infos, "warnings": warnings,
                          **({"parity": parity_rows, "full": full} if args.full else {})}, indent=1))
    else:
        for i in infos:
            extra = f", CUDA {i['cuda']}" if i.get("cuda") else ""
            print(f"{i['framework']} {i['version']}{extra}: {', '.join(i['devices'])}")
        for row in parity_rows or []:
            print(describe_parity(row))
        for row in full or []:
            print(acceptance.describe(row))
        for w in warnings:
            print(f"warning: {w}")
    return 1 if warnings else 0


if __name__ == "__main__":
    sys.exit(main())
