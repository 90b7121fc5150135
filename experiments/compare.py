"""Did normalization pay off? `python -m experiments.compare [--sweep] [--backend jax] [--arch ...]`

Trains nGPT models and their RMSNorm (pre-norm) baselines of the same shape on the same data,
token budget and schedule shape with `experiments.pretrain`, each norm with its own docs/design.md
optimizer defaults (ngpt: no warmup, no weight decay; rmsnorm: 100 warmup steps, weight decay 0.1)
and its own peak learning rates:

- without `--sweep`: one rate per norm (the preset's default, or `--ngpt-lr`/`--rmsnorm-lr`);
- with `--sweep`: a grid per norm (default: the preset's rate times 1/4, 1/2, 1, 2, 4; or
  `--ngpt-lrs`/`--rmsnorm-lrs` as comma lists), each rate over `--seeds` seeds (default 2).

Each norm's best rate is the one with the lowest mean final validation loss over seeds (a rate at
which any seed failed or ended non-finite never wins). Reported: the final loss at each rate as
mean and spread (sample standard deviation, min, max) over seeds, in nats per token and bits per
byte (tnt/units.py: bytes counted from the validation text); at the best rates, how many steps and
wall-clock seconds the nGPT model's seed-mean curve needed to reach the baseline's final mean loss
(linear interpolation between evaluations). `OUT/compare.png` plots the sensitivity curve (final
loss against rate) beside the loss curves against steps and seconds; `OUT/summary.json` holds the
numbers. `--eval-data PATH` also scores the best-rate runs on held-out text (experiments.evaluate),
and `--tasks T1,T2` runs lm-evaluation-harness tasks on them (mean over seeds; `--tasks-limit`,
`--include-path` for local tasks offline).

Runs live in `OUT/<norm>/lr<rate>-seed<seed>` (ordinary pretrain run dirs). Re-running with the
same `--out` reuses finished runs, resumes unfinished ones and trains only what is missing; a run
that failed (e.g. diverged) is recorded in its `FAILED` file and not retried. `OUT/settings.json`
holds the settings every run shares; re-running with different ones is refused. Wall-clock time
is `val/elapsed_sec`, measured from the end of the first (compiling) step of a run's latest
session: it includes evaluation and logging, the same for both. The nGPT paper reports 4x to 20x
fewer steps at 0.5B-1B parameters and 1k-8k context; CPU runs of a tiny model are a smoke test of
that claim, not a reproduction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from experiments import evaluate as held_out
from experiments import pretrain
from experiments.analyze import DPI, FIGSIZE, read_scalars
from experiments.flags import Parser
from tnt.backend import BACKENDS, BackendUnavailable
from tnt.checkpoint_io import read_meta
from tnt.checkpoint_meta import CheckpointError
from tnt.checkpoints import locate
from tnt.config import PRESETS, ConfigError, build_run_config
from tnt.data import DataError, is_prepared, load_corpus, split_documents
from tnt.harness import HarnessError
from tnt.run import make_run_dir, write_atomic
from tnt.tokenizer import tokenizer_from_spec
from tnt.units import bits_per_byte

NORMS = ("ngpt", "rmsnorm")
COLORS = {"ngpt": "tab:blue", "rmsnorm": "tab:orange"}
GRID_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
SWEEP_SEEDS = 2
FAILED = "FAILED"


class CompareError(ValueError):
    """Bad compare input or a sweep that cannot continue; the message says what and where."""


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.compare", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--arch", choices=["encoder_decoder", "decoder_only"], default="encoder_decoder")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--data", default="stdlib", help="as pretrain's --data: text, a token folder, a "
                   "dataset file or folder, or hf:OWNER/NAME[:CONFIG]")
    p.add_argument("--text-field", help="the dataset column that holds the text (text); the same as "
                                        "--set text_field=...")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed, seed+1, ...)")
    p.add_argument("--seeds", type=int, help=f"seeds per rate (default 1, or {SWEEP_SEEDS} with --sweep)")
    p.add_argument("--ngpt-lr", type=float, help="peak lr of the nGPT run (default: the preset's)")
    p.add_argument("--rmsnorm-lr", type=float, help="peak lr of the baseline (default: the preset's)")
    p.add_argument("--sweep", action="store_true", help="sweep a learning-rate grid per norm")
    p.add_argument("--ngpt-lrs", help="comma-separated nGPT rates (implies --sweep)")
    p.add_argument("--rmsnorm-lrs", help="comma-separated baseline rates (implies --sweep)")
    p.add_argument("--eval-data", help="held-out text file/folder or token folder to score the "
                                       "best-rate runs on")
    p.add_argument("--tasks", metavar="T1,T2", help="lm-evaluation-harness tasks to run on the "
                                                    "best-rate runs (extra 'eval')")
    p.add_argument("--tasks-limit", type=float, default=100,
                   help="documents per task (100; a fraction if < 1; 0: all)")
    p.add_argument("--include-path", metavar="DIR", help="folder of local task YAML files")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override applied to every run (repeatable)")
    p.add_argument("--out", help="compare directory (default runs/compare-<backend>-<arch>-<time>)")
    args = p.parse_args(argv)
    if args.text_field:
        args.set.append(f"text_field={args.text_field}")
    return args


@dataclass(frozen=True)
class Run:
    norm: str
    lr: float
    seed: int

    def dir(self, out: Path) -> Path:
        return out / self.norm / f"lr{self.lr:g}-seed{self.seed}"


def parse_rates(text: str, flag: str) -> list[float]:
    """A comma list of positive rates, e.g. "1e-3,2e-3"."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CompareError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if not rates:
        raise CompareError(f"{flag} is empty: give at least one learning rate")
    bad = [r for r in rates if not (np.isfinite(r) and r > 0)]
    if bad:
        raise CompareError(f"{flag} has a learning rate that is not > 0: {bad[0]:g}")
    return sorted(set(rates))


def default_lr(args: argparse.Namespace, norm: str) -> float:
    cfg = build_run_config(args.preset, {"arch": args.arch, "norm": norm}, args.set)
    return cfg.train.resolved(norm).lr


def sweeping(args: argparse.Namespace) -> bool:
    """--sweep, or a rate list given (which implies it)."""
    return bool(args.sweep or args.ngpt_lrs or args.rmsnorm_lrs)


def grids(args: argparse.Namespace) -> dict[str, list[float]]:
    """The rates each norm trains at."""
    sweep = sweeping(args)
    out = {}
    for norm in NORMS:
        listed, single = getattr(args, f"{norm}_lrs"), getattr(args, f"{norm}_lr")
        if listed is not None:
            out[norm] = parse_rates(listed, f"--{norm}-lrs")
        elif single is not None:
            out[norm] = parse_rates(str(single), f"--{norm}-lr")
        else:
            base = default_lr(args, norm)
            out[norm] = [float(f"{base * f:.3g}") for f in GRID_FACTORS] if sweep else [base]
    return out


def plan(args: argparse.Namespace) -> list[Run]:
    """Seed-major order, norms interleaved: a cut-short sweep still holds whole seeds of both."""
    seeds = args.seeds if args.seeds is not None else (SWEEP_SEEDS if sweeping(args) else 1)
    if seeds < 1:
        raise CompareError(f"--seeds must be >= 1, got {seeds}")
    g = grids(args)
    runs = []
    for seed in range(args.seed, args.seed + seeds):
        for i in range(max(len(r) for r in g.values())):
            runs += [Run(norm, g[norm][i], seed) for norm in NORMS if i < len(g[norm])]
    return runs


def settings(args: argparse.Namespace) -> dict:
    """What every run of one compare directory shares."""
    return {"backend": args.backend, "arch": args.arch, "preset": args.preset, "data": args.data,
            "max_steps": args.max_steps, "eval_every": args.eval_every, "set": list(args.set)}


def check_settings(out: Path, want: dict) -> None:
    f = out / "settings.json"
    if f.exists():
        have = json.loads(f.read_text())
        diff = [f"{k}: {have.get(k)!r} there, {v!r} now" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise CompareError(f"{out} holds runs made with other settings ({'; '.join(diff)}); "
                               f"use another --out")
    else:
        write_atomic(f, json.dumps(want, indent=1))


def finished_step(run_dir: Path) -> int | None:
    where = locate(run_dir) if run_dir.exists() else None
    return int(where[0].name) if where else None


def run_one(args: argparse.Namespace, run: Run, out: Path) -> str:
    """Train (or resume) one run; "reused", "trained" or "failed"."""
    d = run.dir(out)
    if (d / FAILED).exists():
        return "failed"
    step = finished_step(d)
    if step is not None and step >= args.max_steps:
        return "reused"
    argv = ["--backend", args.backend, "--preset", args.preset, "--arch", args.arch, "--norm", run.norm,
            "--data", args.data, "--max-steps", str(args.max_steps), "--eval-every",
            str(args.eval_every), "--ckpt-every", str(args.max_steps), "--seed", str(run.seed),
            "--lr", repr(run.lr), "--out", str(d)]
    for item in args.set:
        argv += ["--set", item]
    if step is not None:
        argv.append("--resume")
    rc = pretrain.main(argv)
    if rc == pretrain.EXIT_DIVERGED:  # a property of this rate: kept, never retried
        d.mkdir(parents=True, exist_ok=True)
        (d / FAILED).write_text(f"experiments.pretrain exited with code {rc} (diverged)\n")
        return "failed"
    if rc:  # bad input or a busy folder: nothing about the rate, so nothing is recorded
        raise CompareError(f"the run in {d} stopped with exit code {rc} (see its error line)")
    return "trained"


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
        raise CompareError(f"{run_dir} has no val/loss events")
    loss = dict(zip(sc["val/loss"]["step"].tolist(), sc["val/loss"]["value"].tolist(), strict=True))
    el = sc.get("val/elapsed_sec", {"step": np.zeros(0), "value": np.zeros(0)})
    secs = dict(zip(el["step"].tolist(), el["value"].tolist(), strict=True))
    steps = np.array(sorted(loss))
    return {"step": steps, "loss": np.array([loss[s] for s in steps]),
            "seconds": np.array([secs.get(s, np.nan) for s in steps])}


def mean_curve(curves: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The seed mean of curves evaluated at the same steps (the common steps if they differ)."""
    steps = sorted(set.intersection(*(set(c["step"].tolist()) for c in curves)))
    pick = lambda c, k: np.array([c[k][c["step"].tolist().index(s)] for s in steps])  # noqa: E731
    return {"step": np.array(steps), **{k: np.mean([pick(c, k) for c in curves], axis=0)
                                        for k in ("loss", "seconds")}}


def final_loss(curve: dict[str, np.ndarray] | None) -> float:
    return float(curve["loss"][-1]) if curve is not None and len(curve["loss"]) else float("nan")


def rate_table(runs: list[Run], curves: dict[Run, dict | None], norm: str) -> list[dict]:
    """Per rate of `norm`: the seeds' final losses, mean, sample std, min, max."""
    rows = []
    for lr in sorted({r.lr for r in runs if r.norm == norm}):
        finals = [final_loss(curves[r]) for r in runs if r.norm == norm and r.lr == lr]
        ok = all(np.isfinite(finals))
        arr = np.asarray(finals, np.float64)
        rows.append({"lr": lr, "finals": [f if np.isfinite(f) else None for f in finals],
                     "n": len(finals), "complete": ok,
                     "mean": float(arr.mean()) if ok else None,
                     "std": float(arr.std(ddof=1)) if ok and len(arr) > 1 else (0.0 if ok else None),
                     "min": float(arr.min()) if ok else None, "max": float(arr.max()) if ok else None})
    return rows


def best_rate(rows: list[dict], norm: str) -> dict:
    ok = [r for r in rows if r["complete"]]
    if not ok:
        raise CompareError(f"no {norm} rate finished with a finite loss on every seed; "
                           f"try lower rates")
    return min(ok, key=lambda r: r["mean"])


def summarize(curves: dict[str, dict[str, np.ndarray]]) -> dict:
    """Steps and seconds nGPT needed to reach the baseline's final loss (curves: one per norm)."""
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


def plot(tables: dict[str, list[dict]], best: dict[str, dict], curves: dict[str, dict],
         seed_curves: dict[str, list[dict]], summary: dict, title: str) -> Figure:
    fig = Figure(figsize=(FIGSIZE[0] * 1.5, FIGSIZE[1]), dpi=DPI, layout="constrained")
    ax_lr, ax_s, ax_t = fig.subplots(1, 3)
    for norm in NORMS:
        rows = [r for r in tables[norm] if r["complete"]]
        ax_lr.errorbar([r["lr"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                       fmt="o-", ms=4, capsize=3, color=COLORS[norm], label=f"{norm} (mean ± std)")
        ax_lr.plot([best[norm]["lr"]], [best[norm]["mean"]], "*", ms=14, color=COLORS[norm],
                   label=f"{norm} best {best[norm]['lr']:g}")
        failed = [r["lr"] for r in tables[norm] if not r["complete"]]
        if failed:
            ax_lr.plot(failed, [max(r["mean"] for r in rows)] * len(failed), "x", ms=9,
                       color=COLORS[norm], label=f"{norm} failed/non-finite")
        for c in seed_curves[norm]:
            ax_s.plot(c["step"], c["loss"], "-", lw=0.8, alpha=0.35, color=COLORS[norm])
        c = curves[norm]
        ax_s.plot(c["step"], c["loss"], "o-", ms=3, color=COLORS[norm],
                  label=f"{norm} lr {best[norm]['lr']:g} (seed mean)")
        ax_t.plot(c["seconds"], c["loss"], "o-", ms=3, color=COLORS[norm], label=norm)
    target = summary["baseline_final_val_loss"]
    for ax in (ax_lr, ax_s, ax_t):
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    for ax in (ax_s, ax_t):
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"baseline final {target:.3f}")
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
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("peak learning rate")
    ax_lr.set_title("final validation loss vs learning rate")
    ax_s.set_xlabel("step")
    ax_s.set_title("at the best rates: loss vs steps")
    ax_t.set_xlabel("wall-clock seconds after the first (compiling) step")
    ax_t.set_title("at the best rates: loss vs wall-clock time")
    for ax in (ax_lr, ax_s, ax_t):
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def report(summary: dict) -> str:
    s, lines = summary, []
    bpb = s["units"]["bits_per_byte_per_nat"]
    for norm in NORMS:
        for r in s["rates"][norm]:
            mark = "  <- best" if r["lr"] == s["best_lr"][norm] else ""
            if r["complete"]:
                lines.append(f"{norm:8s} lr {r['lr']:<8g} final val loss {r['mean']:.4f} ± "
                             f"{r['std']:.4f} (n={r['n']}, min {r['min']:.4f}, max {r['max']:.4f}; "
                             f"{r['mean'] * bpb:.4f} bits/byte){mark}")
            else:
                lines.append(f"{norm:8s} lr {r['lr']:<8g} failed or non-finite on some seed")
    lines += [f"baseline (rmsnorm) final val loss {s['baseline_final_val_loss']:.4f} after "
              f"{s['baseline_steps']:.0f} steps ({s['baseline_seconds']:.0f} s)",
              f"nGPT final val loss {s['ngpt_final_val_loss']:.4f} after {s['ngpt_steps']:.0f} steps "
              f"({s['ngpt_seconds']:.0f} s)"]
    if s["ngpt_steps_to_match"] is None:
        lines.append("nGPT never reached the baseline's final validation loss at the best rates")
    else:
        lines.append(f"nGPT reached the baseline's final val loss after {s['ngpt_steps_to_match']:.1f} "
                     f"steps: step ratio {s['step_speedup']:.2f}x (baseline steps / nGPT steps)"
                     + (f", wall-clock ratio {s['time_speedup']:.2f}x ({s['ngpt_seconds_to_match']:.0f} s "
                        f"vs {s['baseline_seconds']:.0f} s)" if s["time_speedup"] else ""))
    for norm, r in (s.get("downstream") or {}).items():
        for task, values in r["mean"].items():
            lines.append(f"{task}: {norm} lr {s['best_lr'][norm]:g} " + ", ".join(
                f"{m} {v:.4f}" for m, v in values.items()) + f" (mean over {len(r['runs'])} seeds)")
    for norm, r in (s.get("held_out") or {}).items():
        lines.append(f"held-out {s['eval_data']}: {norm} lr {s['best_lr'][norm]:g} loss "
                     f"{r['loss_mean']:.4f} nats/token, {r['bits_per_byte_mean']:.4f} bits/byte "
                     f"(mean over {len(r['runs'])} seeds)")
    return "\n".join(lines)


def units(out: Path, run: Run, data: str) -> dict:
    """Tokens and bytes of the validation split, for bits per byte (tnt/units.py)."""
    meta = read_meta(*locate(run.dir(out)))
    train = meta["config"]["train"]
    corpus = load_corpus(data, tokenizer_from_spec(meta["tokenizer"]), train["val_percent"],
                         text_field=train.get("text_field", "text"))
    n_tokens, n_bytes = len(corpus.val), corpus.split_bytes("val")
    return {"val_tokens": n_tokens, "val_bytes": n_bytes,
            "bits_per_byte_per_nat": bits_per_byte(1.0, n_tokens, n_bytes)}


def task_names(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in (args.tasks or "").split(",") if t.strip()]


def downstream(args: argparse.Namespace, dirs: list[Path], manager) -> dict:
    """The tasks on each of `dirs` (one norm's best-rate runs) and each metric's mean over them."""
    found = [held_out.downstream(d, task_names(args), args.backend, args.tasks_limit or None, None,
                                 args.include_path, manager=manager)["tasks"] for d in dirs]
    mean = {task: {m: float(np.mean([f[task][m] for f in found])) for m in values
                   if not m.endswith("_stderr")} for task, values in found[0].items()} if found else {}
    return {"runs": found, "mean": mean}


def compare(args: argparse.Namespace) -> dict:
    runs = plan(args)
    manager = held_out.task_manager(task_names(args), args.include_path) if task_names(args) else None
    out = Path(args.out or f"runs/compare-{args.backend}-{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    train = build_run_config(args.preset, {"arch": args.arch}, args.set).train
    if not is_prepared(args.data):  # refuse data with no text before any training
        split_documents(args.data, train.val_percent, train.text_field)
    make_run_dir(out)
    check_settings(out, settings(args))
    t0 = time.perf_counter()
    for i, run in enumerate(runs, 1):
        print(f"run {i}/{len(runs)}: {run.norm} lr {run.lr:g} seed {run.seed} "
              f"({time.perf_counter() - t0:.0f} s into this sweep)", flush=True)
        status = run_one(args, run, out)
        if status != "trained":
            print(f"run {i}/{len(runs)}: {status}", flush=True)
    curves = {r: (None if (r.dir(out) / FAILED).exists() else val_curve(r.dir(out))) for r in runs}
    tables = {norm: rate_table(runs, curves, norm) for norm in NORMS}
    best = {norm: best_rate(tables[norm], norm) for norm in NORMS}
    seed_curves = {norm: [curves[r] for r in runs if r.norm == norm and r.lr == best[norm]["lr"]]
                   for norm in NORMS}
    mean = {norm: mean_curve(seed_curves[norm]) for norm in NORMS}
    summary = summarize(mean)
    first = next(r for r in runs if curves[r] is not None)
    summary.update({"settings": settings(args), "out": str(out), "n_runs": len(runs),
                    "sweep_seconds": time.perf_counter() - t0, "rates": tables,
                    "best_lr": {n: best[n]["lr"] for n in NORMS},
                    "units": units(out, first, args.data),
                    "runs": [{"norm": r.norm, "lr": r.lr, "seed": r.seed, "dir": str(r.dir(out)),
                              "failed": curves[r] is None, "final_val_loss": final_loss(curves[r]),
                              "curve": None if curves[r] is None else
                              {k: v.tolist() for k, v in curves[r].items()}} for r in runs],
                    "curves": {n: {k: v.tolist() for k, v in c.items()} for n, c in mean.items()}})
    per_nat = summary["units"]["bits_per_byte_per_nat"]
    summary["baseline_final_bits_per_byte"] = summary["baseline_final_val_loss"] * per_nat
    summary["ngpt_final_bits_per_byte"] = summary["ngpt_final_val_loss"] * per_nat
    if args.eval_data:
        summary["eval_data"] = args.eval_data
        summary["held_out"] = {}
        for norm in NORMS:
            rs = [held_out.evaluate(r.dir(out), args.eval_data, args.backend) for r in runs
                  if r.norm == norm and r.lr == best[norm]["lr"] and curves[r] is not None]
            summary["held_out"][norm] = {
                "runs": rs, "loss_mean": float(np.mean([r["loss"] for r in rs])),
                "bits_per_byte_mean": float(np.mean([r["bits_per_byte"] for r in rs]))}
    if manager is not None:
        summary["downstream"] = {norm: downstream(args, [r.dir(out) for r in runs if r.norm == norm and
                                                         r.lr == best[norm]["lr"] and curves[r] is not None],
                                                  manager) for norm in NORMS}
    cfg = json.loads((first.dir(out) / "config.json").read_text())
    m, t = cfg["model"], cfg["train"]
    seeds = sorted({r.seed for r in runs})
    title = (f"nGPT vs RMSNorm baseline: {args.backend}, {m['arch']}, d_model {m['d_model']}, "
             f"{m['n_heads']} heads, layers {m['n_encoder_layers'] if m['arch'] == 'encoder_decoder' else 0}"
             f"+{m['n_decoder_layers']}, batch {t['batch_size']} x {t['seq_len']}, "
             f"{t['max_steps']} steps, seeds {seeds[0]}..{seeds[-1]}")
    plot(tables, best, mean, seed_curves, summary, title).savefig(out / "compare.png", dpi=DPI)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = compare(args)
    except (CompareError, ConfigError, DataError, CheckpointError, BackendUnavailable, HarnessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(summary))
    print(f"plot: {Path(summary['out']) / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
