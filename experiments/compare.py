"""Did normalization pay off? `python -m experiments.compare [--backend jax] [--arch ...]`

Trains an nGPT model and its RMSNorm (pre-norm) baseline of the same shape on the same data, token
budget and seed with `experiments.pretrain`, each with its own docs/design.md optimizer defaults (ngpt:
lr 15e-4, no warmup, no weight decay; rmsnorm: lr 6e-4, 100 warmup steps, weight decay 0.1; the
peak learning rates can be tuned separately with `--ngpt-lr` and `--rmsnorm-lr`), then

- plots validation loss against steps and against wall-clock seconds on one figure
  (`OUT/compare.png`), and writes the numbers to `OUT/summary.json`;
- prints how many steps the nGPT model needed to reach the baseline's final validation loss
  (linear interpolation between evaluations) and the resulting speed-up. The nGPT paper reports
  4x to 20x fewer steps at 0.5B-1B parameters and 1k-8k context; a few hundred CPU steps of a tiny
  model are a smoke test of that claim, not a reproduction.

Runs live in `OUT/ngpt` and `OUT/rmsnorm` (ordinary pretrain run dirs: `python -m
experiments.analyze OUT/ngpt` works on them). Re-running with the same `--out` resumes unfinished
runs and re-plots finished ones. Wall-clock time is `val/elapsed_sec`, measured from the end of
the first (compiling) step of a run's latest session: it includes evaluation and logging, the same
for both.
The default (cpu preset, 400 steps each, validation every 25 steps) took 3.6 minutes in all with
the jax backend on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from experiments import pretrain
from experiments.analyze import DPI, FIGSIZE, read_scalars
from experiments.backends import BACKENDS
from experiments.checkpoints import locate
from tnt.config import PRESETS

NORMS = ("ngpt", "rmsnorm")
COLORS = {"ngpt": "tab:blue", "rmsnorm": "tab:orange"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--arch", choices=["encoder_decoder", "decoder_only"], default="encoder_decoder")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--data", default="stdlib")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ngpt-lr", type=float, help="peak lr of the nGPT run (default 15e-4)")
    p.add_argument("--rmsnorm-lr", type=float, help="peak lr of the baseline (default 6e-4)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override applied to both runs (repeatable)")
    p.add_argument("--out", help="compare directory (default runs/compare-<backend>-<arch>-<time>)")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, norm: str, out: Path) -> None:
    argv = ["--backend", args.backend, "--preset", args.preset, "--arch", args.arch, "--norm", norm,
            "--data", args.data, "--max-steps", str(args.max_steps), "--eval-every",
            str(args.eval_every), "--ckpt-every", str(args.max_steps), "--seed", str(args.seed),
            "--out", str(out)]
    for item in args.set:
        argv += ["--set", item]
    lr = getattr(args, f"{norm}_lr", None)
    if lr is not None:
        argv += ["--lr", str(lr)]
    if out.exists() and locate(out) is not None:
        argv.append("--resume")
    rc = pretrain.main(argv)
    if rc:
        raise RuntimeError(f"the {norm} run failed (exit code {rc}); see the error above")


def steps_to_reach(steps: np.ndarray, losses: np.ndarray, target: float) -> float | None:
    """The first step at which the curve reaches `target`, interpolating linearly between the two
    evaluations around the crossing; None if it never does."""
    steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
    below = np.nonzero(losses <= target)[0]
    if not len(below):
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
    return float(s0 + (l0 - target) * (s1 - s0) / (l0 - l1))


def val_curve(run_dir: Path) -> dict[str, np.ndarray]:
    """Validation loss by step and elapsed seconds; the last value wins for a repeated step."""
    sc = read_scalars(run_dir / "tb", ("val/loss", "val/elapsed_sec"))
    if "val/loss" not in sc:
        raise RuntimeError(f"{run_dir} has no val/loss events")
    loss = dict(zip(sc["val/loss"]["step"].tolist(), sc["val/loss"]["value"].tolist(), strict=True))
    el = sc.get("val/elapsed_sec", {"step": np.zeros(0), "value": np.zeros(0)})
    secs = dict(zip(el["step"].tolist(), el["value"].tolist(), strict=True))
    steps = np.array(sorted(loss))
    return {"step": steps, "loss": np.array([loss[s] for s in steps]),
            "seconds": np.array([secs.get(s, np.nan) for s in steps])}


def summarize(curves: dict[str, dict[str, np.ndarray]]) -> dict:
    base, ngpt = curves["rmsnorm"], curves["ngpt"]
    target, base_steps = float(base["loss"][-1]), float(base["step"][-1])
    hit = steps_to_reach(ngpt["step"], ngpt["loss"], target)
    secs = (float(np.interp(hit, ngpt["step"], ngpt["seconds"]))
            if hit is not None and np.isfinite(ngpt["seconds"]).all() else None)
    return {"baseline_final_val_loss": target, "baseline_steps": base_steps,
            "baseline_seconds": float(base["seconds"][-1]),
            "ngpt_final_val_loss": float(ngpt["loss"][-1]), "ngpt_steps": float(ngpt["step"][-1]),
            "ngpt_seconds": float(ngpt["seconds"][-1]),
            "ngpt_steps_to_match": hit, "ngpt_seconds_to_match": secs,
            "step_speedup": base_steps / hit if hit else None,
            "time_speedup": float(base["seconds"][-1]) / secs if secs else None}


def plot(curves: dict[str, dict[str, np.ndarray]], summary: dict, title: str) -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax_s, ax_t = fig.subplots(1, 2)
    target = summary["baseline_final_val_loss"]
    for norm in NORMS:
        c = curves[norm]
        ax_s.plot(c["step"], c["loss"], "o-", ms=3, color=COLORS[norm], label=norm)
        ax_t.plot(c["seconds"], c["loss"], "o-", ms=3, color=COLORS[norm], label=norm)
    for ax in (ax_s, ax_t):
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"baseline final {target:.3f}")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    if summary["ngpt_steps_to_match"] is not None:
        ax_s.axvline(summary["ngpt_steps_to_match"], ls=":", color=COLORS["ngpt"], lw=1,
                     label=f"nGPT reaches it at step {summary['ngpt_steps_to_match']:.0f} "
                           f"(step ratio {summary['step_speedup']:.2f}x)")
    else:
        ax_s.text(0.5, 0.97, "nGPT never reached the baseline's final validation loss",
                  transform=ax_s.transAxes, ha="center", va="top", color=COLORS["ngpt"])
    if summary["ngpt_seconds_to_match"] is not None:
        ax_t.axvline(summary["ngpt_seconds_to_match"], ls=":", color=COLORS["ngpt"], lw=1,
                     label=f"nGPT reaches it at {summary['ngpt_seconds_to_match']:.0f} s "
                           f"(time ratio {summary['time_speedup']:.2f}x)")
    ax_s.set_xlabel("step")
    ax_s.set_title("validation loss vs steps")
    ax_t.set_xlabel("wall-clock seconds after the first (compiling) step")
    ax_t.set_title("validation loss vs wall-clock time")
    ax_s.legend(fontsize=8)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def report(summary: dict) -> str:
    s = summary
    lines = [f"baseline (rmsnorm) final val loss {s['baseline_final_val_loss']:.4f} after "
             f"{s['baseline_steps']:.0f} steps ({s['baseline_seconds']:.0f} s)",
             f"nGPT final val loss {s['ngpt_final_val_loss']:.4f} after {s['ngpt_steps']:.0f} steps "
             f"({s['ngpt_seconds']:.0f} s)"]
    if s["ngpt_steps_to_match"] is None:
        lines.append("nGPT never reached the baseline's final validation loss in this run")
    else:
        lines.append(f"nGPT reached the baseline's final val loss after {s['ngpt_steps_to_match']:.1f} "
                     f"steps: step ratio {s['step_speedup']:.2f}x (baseline steps / nGPT steps)"
                     + (f", wall-clock ratio {s['time_speedup']:.2f}x ({s['ngpt_seconds_to_match']:.0f} s "
                        f"vs {s['baseline_seconds']:.0f} s)" if s["time_speedup"] else ""))
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> dict:
    out = Path(args.out or f"runs/compare-{args.backend}-{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    for norm in NORMS:
        run_one(args, norm, out / norm)
    curves = {norm: val_curve(out / norm) for norm in NORMS}
    summary = summarize(curves)
    cfg = json.loads((out / "ngpt" / "config.json").read_text())
    m, t = cfg["model"], cfg["train"]
    title = (f"nGPT vs RMSNorm baseline: {args.backend}, {m['arch']}, d_model {m['d_model']}, "
             f"{m['n_heads']} heads, layers {m['n_encoder_layers'] if m['arch'] == 'encoder_decoder' else 0}"
             f"+{m['n_decoder_layers']}, batch {t['batch_size']} x {t['seq_len']}, seed {t['seed']}")
    plot(curves, summary, title).savefig(out / "compare.png", dpi=DPI)
    summary.update({"backend": args.backend, "arch": m["arch"], "out": str(out),
                    "curves": {n: {k: v.tolist() for k, v in c.items()} for n, c in curves.items()}})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = compare(args)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(summary))
    print(f"plot: {Path(summary['out']) / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
