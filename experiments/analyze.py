"""Look inside a trained TnT: `python -m experiments.analyze RUN_DIR_OR_CHECKPOINT [--out DIR]`.

Works on a run of either backend (the checkpoint layout tells which). Writes one PNG per view,
each titled and with labelled axes, and `report.html` showing them all with the key numbers:

  eigen_lrs.png          |alpha| per layer (mean, error bar = std) for attn, cross and mlp (ngpt)
  scalers.png            s_qk, s_u, s_v per layer and s_z (ngpt; stored values, the MLP gate
                         uses s_uv*sqrt(d)), or the RMSNorm gains (rmsnorm)
  condition_numbers.png  sigma_max/sigma_min of wq, wk, wv, wo, w_in, w_out per layer
  embedding_norms.png    norm of every token vector (not the pad) of encoder.embed, decoder.embed, lm_head
  embedding_spectrum.png eigenvalues of the embeddings' covariance divided by their median
  embedding_cosines.png  distribution of pairwise cosine similarities (sampled for large V)
  training_curves.png    train/val loss, learning rate and tokens/s from RUN_DIR/tb

The numbers come from `tnt/analysis.py` (numpy only).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from experiments.flags import Parser
from tnt import analysis
from tnt.checkpoint_meta import CheckpointError
from tnt.checkpoints import Checkpoint, locate, read_checkpoint
from tnt.config import ConfigError
from tnt.params import param_specs

FIGSIZE, DPI = (12.0, 5.0), 100  # every PNG is 1200 x 500 pixels
CURVE_TAGS = ("train/loss", "val/loss", "train/lr", "train/tokens_per_sec")
STACK_TITLE = {"encoder": "encoder", "decoder": "decoder"}


def new_figure(ncols: int = 1, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(nrows, ncols)
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": every PNG keeps FIGSIZE x DPI pixels
    return path


# ---------------------------------------------------------------------------------------------
# Views: each returns a Figure (so tests can read the plotted data) or None when not applicable


def plot_layer_table(tables: dict[str, dict[str, np.ndarray]], title: str, ylabel: str,
                     log: bool = False) -> Figure | None:
    """One panel per stack; per key a line over layers with error bars (column 1 if present)."""
    stacks = [s for s, t in tables.items() if t]
    if not stacks:
        return None
    fig, axes = new_figure(len(stacks))
    for ax, stack in zip(axes[0], stacks, strict=True):
        for key, t in tables[stack].items():
            t = np.asarray(t, np.float64)
            x = np.arange(len(t))
            if t.ndim == 2:
                ax.errorbar(x, t[:, 0], yerr=t[:, 1], marker="o", capsize=3, label=key)
            else:
                ax.plot(x, t, marker="o", label=key)
        ax.set_title(f"{STACK_TITLE[stack]}")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(max(len(np.atleast_1d(v)) for v in tables[stack].values())))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_eigen_lrs(params, specs) -> Figure | None:
    return plot_layer_table(analysis.eigen_lrs(params, specs),
                            "Eigen learning rates |alpha| per layer (mean, bar = std over d)",
                            "|alpha|")


def plot_scalers(params, specs) -> Figure | None:
    per_layer, glob = analysis.scalers(params, specs), analysis.global_scalers(params, specs)
    stacks = [s for s, t in per_layer.items() if t]
    if not stacks and not glob:
        return None
    fig, axes = new_figure(len(stacks) + (1 if glob else 0))
    for ax, stack in zip(axes[0], stacks, strict=False):
        for key, t in per_layer[stack].items():
            ax.errorbar(np.arange(len(t)), t[:, 0], yerr=t[:, 1], marker="o", capsize=3, label=key)
        ax.set_title(stack)
        ax.set_xlabel("layer")
        ax.set_ylabel("stored value (mean, bar = std)")
        ax.set_xticks(range(len(next(iter(per_layer[stack].values())))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if glob:
        ax = axes[0][-1]
        for name, v in glob.items():
            ax.hist(np.asarray(v, np.float64), bins=50, histtype="step", label=name)
        ax.set_title("global scalers")
        ax.set_xlabel("value")
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
    ngpt = analysis.is_ngpt(specs)
    fig.suptitle("nGPT scalers (stored values; the MLP gate uses s_uv * sqrt(d_model))" if ngpt
                 else "RMSNorm gains per layer")
    return fig


def plot_condition_numbers(params, specs, cond: dict | None = None) -> Figure | None:
    return plot_layer_table(cond if cond is not None else analysis.condition_numbers(params, specs),
                            "Condition numbers sigma_max / sigma_min of the attention and MLP "
                            "matrices", "condition number (log)", log=True)


def plot_embedding_norms(stats: dict[str, analysis.EmbeddingStats]) -> Figure:
    """Top row: the norm of every token vector by id; bottom row: their histogram."""
    fig, axes = new_figure(len(stats), 2)
    for col, (name, e) in enumerate(stats.items()):
        ax = axes[0][col]
        ax.plot(np.arange(len(e.norms)), e.norms, lw=0.8)
        lo, hi = float(e.norms.min()), float(e.norms.max())
        pad = max(0.05 * (hi - lo), 0.05 * max(abs(hi), 1e-6))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{name}: token vector norms")
        ax.set_xlabel("token id")
        ax.set_ylabel("L2 norm")
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        ax.hist(e.norms, bins=40, range=(lo - pad, hi + pad))
        ax.set_xlabel("L2 norm")
        ax.set_ylabel("tokens")
    fig.suptitle("Distribution of embedding norms (lm_head: its columns)")
    return fig


def plot_embedding_spectrum(stats: dict[str, analysis.EmbeddingStats]) -> Figure:
    fig, axes = new_figure()
    ax = axes[0][0]
    for name, e in stats.items():
        ax.plot(np.arange(1, len(e.spectrum) + 1), np.maximum(e.spectrum, 1e-12), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue / median eigenvalue (log)")
    ax.set_title("Eigenvalue spectrum of the embeddings' covariance, normalized by its median")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_embedding_cosines(stats: dict[str, analysis.EmbeddingStats]) -> Figure:
    fig, axes = new_figure()
    ax = axes[0][0]
    for name, e in stats.items():
        ax.hist(e.cosines, bins=80, range=(-1, 1), density=True, histtype="step", lw=1.5,
                label=f"{name} ({len(e.cosines):,} pairs)")
    ax.set_xlabel("cosine similarity between two token vectors")
    ax.set_ylabel("density")
    ax.set_title("Pairwise cosine similarities of the embeddings (random pairs when V is large)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def read_scalars(tb_dir: str | Path, tags=CURVE_TAGS) -> dict[str, dict[str, np.ndarray]]:
    """`{tag: {"step", "value", "wall_time"}}` for the tags present in a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in present:
            ev = acc.Scalars(tag)
            out[tag] = {"step": np.array([e.step for e in ev]),
                        "value": np.array([e.value for e in ev]),
                        "wall_time": np.array([e.wall_time for e in ev])}
    return out


def plot_training_curves(curves: dict[str, dict[str, np.ndarray]]) -> Figure | None:
    if not curves:
        return None
    fig, axes = new_figure(3)
    ax = axes[0][0]
    for tag, style in (("train/loss", "-"), ("val/loss", "o-")):
        if tag in curves:
            ax.plot(curves[tag]["step"], curves[tag]["value"], style, label=tag, ms=4)
    ax.set_title("loss")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    for ax, tag, title, ylabel in ((axes[0][1], "train/lr", "learning rate", "lr"),
                                   (axes[0][2], "train/tokens_per_sec", "throughput",
                                    "tokens / s")):
        if tag in curves:
            ax.plot(curves[tag]["step"], curves[tag]["value"])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves")
    return fig


# ---------------------------------------------------------------------------------------------
# Report


def views(ckpt: Checkpoint | None, curves, stats: dict | None = None, cond: dict | None = None
          ) -> dict[str, tuple[str, Figure | None]]:
    """file name -> (caption, figure or None when the view does not apply)."""
    out: dict[str, tuple[str, Figure | None]] = {}
    if ckpt is not None:
        p, specs = ckpt.params, param_specs(ckpt.config.model)
        stats = stats if stats is not None else analysis.embedding_stats(p, specs)
        out["eigen_lrs.png"] = ("Eigen learning rates |alpha| (attention, cross-attention, MLP)",
                                plot_eigen_lrs(p, specs))
        out["scalers.png"] = ("Scalers s_qk, s_u, s_v, s_z (stored values)"
                              if analysis.is_ngpt(specs) else "RMSNorm gains",
                              plot_scalers(p, specs))
        out["condition_numbers.png"] = ("Condition numbers of Q/K/V/output and MLP matrices",
                                        plot_condition_numbers(p, specs, cond))
        out["embedding_norms.png"] = ("Embedding norms", plot_embedding_norms(stats))
        out["embedding_spectrum.png"] = ("Embedding covariance spectrum / median",
                                         plot_embedding_spectrum(stats))
        out["embedding_cosines.png"] = ("Pairwise cosine similarities of embeddings",
                                        plot_embedding_cosines(stats))
    out["training_curves.png"] = ("Training curves (loss, learning rate, tokens/s)",
                                  plot_training_curves(curves))
    return out


def curve_numbers(curves) -> dict[str, float]:
    out = {}
    if "val/loss" in curves:
        out["final val loss"] = float(curves["val/loss"]["value"][-1])
        out["best val loss"] = float(curves["val/loss"]["value"].min())
    if "train/loss" in curves:
        out["final train loss"] = float(curves["train/loss"]["value"][-1])
    if "train/tokens_per_sec" in curves:
        out["median tokens/s"] = float(np.median(curves["train/tokens_per_sec"]["value"][1:]
                                                 if len(curves["train/tokens_per_sec"]["value"]) > 1
                                                 else curves["train/tokens_per_sec"]["value"]))
    return out


def write_report(out: Path, title: str, facts: dict[str, object], numbers: dict[str, float],
                 images: dict[str, str], skipped: list[str]) -> Path:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in facts.items())
    nums = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in numbers.items())
    figs = "".join(f'<figure><a href="{html.escape(f)}"><img src="{html.escape(f)}" '
                   f'alt="{html.escape(c)}" width="900"></a><figcaption>{html.escape(c)} '
                   f'(<a href="{html.escape(f)}">{html.escape(f)}</a>)</figcaption></figure>'
                   for f, c in images.items())
    skip = ("<p>Not applicable here: " + html.escape(", ".join(skipped)) + "</p>") if skipped else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
            "td{padding:2px 10px}tr:nth-child(even){background:#f3f3f3}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table>{rows}</table><h2>Key numbers</h2>"
            f"<p>Scalers are stored values; the MLP gate multiplies s_uv by sqrt(d_model).</p>"
            f"<table>{nums}</table><h2>Plots</h2>{skip}{figs}</body></html>")
    path = out / "report.html"
    path.write_text(page)
    return path


def analyze(path: str | Path, out: str | Path | None = None) -> Path:
    """Write every view and `report.html` for a run dir or checkpoint; returns the report's path."""
    if out is not None and not str(out).strip():
        raise ConfigError("--out is empty; name the analysis folder (or leave --out out)")
    path = Path(path).absolute()
    ckpt = read_checkpoint(path) if locate(path) is not None else None
    specs = param_specs(ckpt.config.model) if ckpt is not None else None
    if ckpt is not None:  # every view is about tokens: the pad id is not one
        ckpt = dataclasses.replace(ckpt, params=analysis.token_params(
            ckpt.params, specs, ckpt.config.model.pad_id))
    run_dir = ckpt.run_dir if ckpt is not None else path
    tb = run_dir / "tb" if run_dir is not None else None
    curves = read_scalars(tb) if tb is not None and tb.is_dir() else {}
    if ckpt is None and not curves:
        raise CheckpointError(f"{path} holds neither a TnT checkpoint nor TensorBoard events")
    if out is None:  # beside the run, or beside a bare step folder (never inside a checkpoint)
        out = run_dir / "analysis" if run_dir else ckpt.step_dir.parent / f"analysis-{ckpt.step}"
    out = writable_folder(Path(out))
    stats = analysis.embedding_stats(ckpt.params, specs) if ckpt is not None else None
    cond = analysis.condition_numbers(ckpt.params, specs) if ckpt is not None else None
    images, skipped = {}, []
    for name, (caption, fig) in views(ckpt, curves, stats, cond).items():
        if fig is None:
            skipped.append(name)
        else:
            try:
                save(fig, out / name)
            except OSError as e:
                raise ConfigError(f"cannot write {out / name}: {e.strerror or e}") from e
            images[name] = caption
    facts = {"source": str(path)}
    numbers = curve_numbers(curves)
    if ckpt is not None:
        m = ckpt.config.model
        facts.update({"backend": ckpt.backend, "step": ckpt.step, "checkpoint": str(ckpt.step_dir),
                      "model": f"{m.arch}, {m.norm}, d_model {m.d_model}, {m.n_heads} heads, "
                               f"{m.n_encoder_layers if m.has_encoder else 0}+{m.n_decoder_layers} "
                               f"layers, F {m.hidden}, vocab {m.vocab_size}"})
        numbers.update(analysis.key_numbers(ckpt.params, specs, cond, stats))
    try:
        (out / "numbers.json").write_text(json.dumps({"facts": facts, "numbers": numbers}, indent=1))
        return write_report(out, f"TnT analysis: {run_dir.name if run_dir else path.name}", facts,
                            numbers, images, skipped)
    except OSError as e:  # e.g. the disk filled up while writing
        raise ConfigError(f"cannot write the analysis folder {out}: {e.strerror or e}") from e


def writable_folder(out: Path) -> Path:
    """`out`, created, once it is known to take files; else a ConfigError naming it (before any
    work: a read-only run folder needs `--out` elsewhere)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder for the analysis")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the analysis folder {out}: {e.strerror or e}; choose "
                          f"another with --out DIR") from e
    return out


def main(argv=None) -> int:
    p = Parser(prog="python -m experiments.analyze", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run directory, its checkpoints folder, or one step folder")
    p.add_argument("--out", help="output folder (default RUN_DIR/analysis)")
    args = p.parse_args(argv)
    try:
        report = analyze(args.path, args.out)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report} and its plots in {report.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
