"""Training dynamics in TensorBoard: every `analysis_every` steps, a `tnt.run.Run` logs

  dyn/alpha/<layer>.<block>       mean |alpha| (eigen learning rate) per layer and block (ngpt)
  dyn/alpha_std/<layer>.<block>   its spread over d
  dyn/scaler/<layer>.<s_qk|s_u|s_v|..._norm>, dyn/scaler/s_z   scaler means (stored values; the
                                  MLP gate uses s_uv * sqrt(d)); the RMSNorm gains for rmsnorm
  dyn/cond/<matrix>               condition number of each attention and MLP matrix
  dyn/wnorm/<matrix>              Frobenius norm of each matrix; mean row norm of each embedding
                                  (rmsnorm only: nGPT's embeddings are unit-norm by construction)
  hist/<scaler>                   histograms of every scaler vector (left out at a step where it
                                  holds a value TensorBoard's buckets cannot take: non-finite or
                                  beyond HIST_LIMIT; its mean above still shows it)

Cost: one host copy of the parameters involved and, per matrix, the eigenvalues of its smaller
Gram matrix (`condition_number(fast=True)`, several times cheaper than an SVD), with numpy's
BLAS held to one thread. For models with more than `max_cond_layers` layers per stack, condition
numbers and weight norms cover an evenly spaced subset of layers (first and last included), so the
cost stays bounded; scalers, which are small vectors, are always logged for every layer.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from tnt import analysis
from tnt.config import ModelConfig
from tnt.params import param_specs

HIST_LIMIT = 1e19  # within tensorboardX's outermost default bucket (about 9.9e19)


def histogram_ok(v: np.ndarray) -> bool:
    """Whether TensorBoard's default buckets can hold every value (tensorboardX raises "The
    histogram is empty" when none falls inside them)."""
    return v.size > 0 and bool(np.isfinite(v).all()) and float(np.abs(v).max()) <= HIST_LIMIT


def chosen_layers(n: int, max_layers: int) -> list[int]:
    """All layers when there are at most `max_layers`, else an evenly spaced subset incl. ends."""
    if n <= max_layers:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, max_layers)})


class Dynamics:
    """Which arrays to fetch and how to log them; `log(writer, backend, step)` does one interval."""

    def __init__(self, cfg: ModelConfig, max_cond_layers: int = 4) -> None:
        self.specs = specs = param_specs(cfg)
        stacks = {s: chosen_layers(n, max_cond_layers) for s, n in analysis.layers(specs).items()}
        self.scalers = analysis.scaler_names(specs)
        self.matrices = analysis.matrix_names(specs, stacks)
        # ngpt embeddings are unit-norm rows by construction; their norms only move for rmsnorm
        self.embeddings = [] if cfg.norm == "ngpt" else analysis.embedding_names(specs)

    @property
    def names(self) -> list[str]:
        return self.scalers + self.matrices + self.embeddings

    def values(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(scalars by tag, histograms by tag) for one interval; non-finite or huge weights give
        nan/inf scalars and no histogram, never an error (the divergence guard decides)."""
        scalars: dict[str, float] = {}
        hists: dict[str, np.ndarray] = {}
        for name in self.scalers:
            spec = self.specs[name]
            v = np.asarray(arrays[name], np.float64)
            module = name.removesuffix(f".{spec.attr}")  # "decoder.layers.0.attn", "...attn_norm"
            if spec.kind == "alpha":
                a = np.abs(v)
                scalars[f"dyn/alpha/{module}"] = float(a.mean())
                scalars[f"dyn/alpha_std/{module}"] = float(a.std())
            elif spec.kind == "s_uv":
                s_u, s_v = analysis.split_s_uv(v)
                scalars[f"dyn/scaler/{module}.s_u"] = float(s_u.mean())
                scalars[f"dyn/scaler/{module}.s_v"] = float(s_v.mean())
            else:  # s_qk and s_z by name, an RMSNorm gain by its norm ("...attn_norm")
                scalars[f"dyn/scaler/{module if spec.kind == 'norm_scale' else name}"] = float(v.mean())
            if histogram_ok(v):
                hists[f"hist/{name}"] = v
        for name in self.matrices:
            w = np.asarray(arrays[name], np.float64)
            scalars[f"dyn/cond/{name}"] = analysis.condition_number(w, fast=True)
            scalars[f"dyn/wnorm/{name}"] = float(np.linalg.norm(w))
        for name in self.embeddings:
            norms = analysis.row_norms(analysis.embedding_rows(self.specs[name], arrays[name]))
            scalars[f"dyn/wnorm/{name}"] = float(norms.mean())
        return scalars, hists

    def log(self, writer, trainer, step: int) -> None:
        arrays = trainer.arrays(self.names)
        # One BLAS thread: these matrices are small, and a multi-threaded OpenBLAS next to the
        # framework's own thread pool was measured 10-30x slower on a loaded 2-core machine.
        with threadpool_limits(limits=1, user_api="blas"), np.errstate(all="ignore"):
            scalars, hists = self.values(arrays)  # a diverged weight overflows to inf, silently
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        for tag, value in hists.items():
            writer.add_histogram(tag, value, step)
