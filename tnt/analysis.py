"""What a trained TnT holds, computed from its canonical parameters (numpy only, either framework).

Every function takes the flat canonical dict (`tnt/params.py`: `decoder.layers.0.attn.alpha`,
`lm_head` `[d, V]`, ...) as numpy arrays, so a checkpoint of either backend, or a live model's
`backend.arrays(...)`, can be studied the same way, and the config's parameter table
(`tnt.params.param_specs`), whose fields (stack, layer, block, kind, axes) say what each array
is. The views follow the nGPT paper's analysis (Loshchilov et al. 2024, section 4 and
appendix): eigen learning rates `|alpha|` per layer, the
scaling factors `s_qk`, `s_u`, `s_v`, `s_z`, condition numbers of the attention and MLP matrices,
and the norms, covariance spectrum and pairwise cosine similarities of the embeddings.

Scalers are reported at their stored value, which docs/design.md fixes as the value the forward pass
uses, except `s_uv`: the forward pass multiplies it by `sqrt(d)` (the effective gate scale is
`s_uv * sqrt(d)`). `s_uv [2F]` splits into `s_u = s_uv[:F]` and `s_v = s_uv[F:]`.

rmsnorm models have no alphas or nGPT scalers; they get the RMSNorm gains (`*_norm.scale`) as their
scalers and every matrix and embedding view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tnt.params import SCALER_KINDS, ParamSpec

Specs = dict[str, ParamSpec]


# ---------------------------------------------------------------------------------------------
# Single-array measures


def condition_number(w: np.ndarray, fast: bool = False) -> float:
    """sigma_max / sigma_min of a matrix (inf when it is rank deficient to float precision, nan
    when it holds a non-finite value).

    `fast=True` takes the eigenvalues of the smaller Gram matrix (`W W^T` or `W^T W`, float64)
    instead of an SVD: several times cheaper for the wide `w_in [d, 2F]`, and exact to about 1e-8
    relative while the condition number stays below ~1e6 (the Gram matrix squares it); used for
    the TensorBoard dynamics during training.
    """
    w = np.asarray(w, np.float64)
    if not np.isfinite(w).all():
        return float("nan")
    top = np.abs(w).max(initial=0.0)
    if top == 0:
        return float("inf")
    w = w / top  # the ratio is scale free; this keeps a diverged matrix's Gram from overflowing
    if fast:
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        ev = np.linalg.eigvalsh(g)
        lo, hi = ev[0], ev[-1]
        return float(np.sqrt(hi / lo)) if lo > 0 else float("inf")
    s = np.linalg.svd(w, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def embedding_rows(spec: ParamSpec, w: np.ndarray) -> np.ndarray:
    """The `[V, d]` token vectors of an embedding: `*.embed` as stored, `lm_head` `[d, V]` transposed."""
    return np.asarray(w) if spec.axes[0] == "vocab" else np.asarray(w).T


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of every row of `[V, d]`, computed in float64."""
    return np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=1))


def covariance_spectrum(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of the `[d, d]` covariance of the rows of `x`, descending, divided by their median.

    nGPT's figure of the embeddings' spectrum: a flat curve means the vectors use every direction;
    a steep one means they live in a few. `[d, d]`, never `[V, V]`.
    """
    x = np.asarray(x, np.float64)
    cov = np.cov(x, rowvar=False)
    ev = np.sort(np.clip(np.linalg.eigvalsh(np.atleast_2d(cov)), 0.0, None))[::-1]
    med = np.median(ev)
    return ev / med if med > 0 else ev


def pairwise_cosines(x: np.ndarray, max_pairs: int = 200_000, seed: int = 0) -> np.ndarray:
    """Cosine similarities between distinct rows of `x`: all pairs when they number at most
    `max_pairs`, else `max_pairs` random pairs (so memory is O(max_pairs * d), never V x V)."""
    x = np.asarray(x, np.float64)
    u = x / np.maximum(row_norms(x), 1e-12)[:, None]
    n = len(u)
    if n < 2:
        return np.zeros(0)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, max_pairs)
        j = (i + rng.integers(1, n, max_pairs)) % n  # j != i
    return np.einsum("pd,pd->p", u[i], u[j])


def spread(x: np.ndarray) -> dict[str, float]:
    """mean, std, min and max of an array."""
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max())}


# ---------------------------------------------------------------------------------------------
# The model's structure, read from the parameter table


def layers(specs: Specs) -> dict[str, int]:
    """Number of layers per stack (`{"encoder": 2, "decoder": 2}`)."""
    out: dict[str, int] = {}
    for s in specs.values():
        if s.layer is not None:
            out[s.stack] = max(out.get(s.stack, 0), s.layer + 1)
    return {s: out[s] for s in ("encoder", "decoder") if s in out}


def is_ngpt(specs: Specs) -> bool:
    return any(s.kind == "s_z" for s in specs.values())


def split_s_uv(s_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(s_u, s_v)`: the first and the last F entries of `s_uv [2F]` (docs/design.md, forward pass)."""
    f = len(s_uv) // 2
    return s_uv[:f], s_uv[f:]


def matrix_names(specs: Specs, stacks: dict[str, list[int]] | None = None) -> list[str]:
    """The attention and MLP matrices, stack by stack and layer by layer, optionally only for
    some layers of each stack (`{stack: [layer indices]}`)."""
    return [n for n, s in specs.items() if s.kind == "matrix"
            and (stacks is None or s.stack not in stacks or s.layer in stacks[s.stack])]


def scaler_names(specs: Specs) -> list[str]:
    """Every scaler vector: alphas, s_qk, s_uv, s_z (ngpt) or the RMSNorm gains (rmsnorm)."""
    return [n for n, s in specs.items() if s.kind in SCALER_KINDS]


def token_params(params, specs: Specs, pad_id: int) -> dict[str, np.ndarray]:
    """`params` without the pad id's entry along every vocabulary axis (embedding rows, lm_head
    column, `s_z`): the views describe tokens, and the pad is none (never a training input or
    target; an imported model's is an appended placeholder whose logit is 0, docs/design.md
    "Special ids")."""
    out = dict(params)
    for name, s in specs.items():
        if "vocab" in s.axes:
            out[name] = np.delete(out[name], pad_id, axis=s.axes.index("vocab"))
    return out


def embedding_names(specs: Specs) -> list[str]:
    """The token embeddings of each stack, then lm_head (the output embedding)."""
    return [n for n, s in specs.items() if s.kind == "embed"] + [
        n for n, s in specs.items() if s.kind == "lm_head"]


# ---------------------------------------------------------------------------------------------
# Per-layer tables


def _per_layer(specs: Specs, kind: str):
    """(stack, n_layers, block, [spec of each layer]) for every stack and block holding `kind`."""
    n_layers = layers(specs)
    found: dict[tuple[str, str], dict[int, ParamSpec]] = {}
    for s in specs.values():
        if s.kind == kind and s.layer is not None:
            found.setdefault((s.stack, s.block), {})[s.layer] = s
    for (stack, block), by_layer in found.items():
        n = n_layers[stack]
        if len(by_layer) == n:
            yield stack, block, [by_layer[i] for i in range(n)]


def _mean_std(v) -> list[float]:
    v = np.asarray(v, np.float64)
    return [v.mean(), v.std()]


def eigen_lrs(params, specs: Specs) -> dict[str, dict[str, np.ndarray]]:
    """`{stack: {block: array [n_layers, 2]}}` of `|alpha|` mean and std per layer (ngpt only).

    The eigen learning rates are `|alpha|` (the forward pass uses `abs(alpha)`, docs/design.md)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for stack, block, per_layer in _per_layer(specs, "alpha"):
        out.setdefault(stack, {})[block] = np.array([_mean_std(np.abs(params[s.name]))
                                                     for s in per_layer])
    return out


def scalers(params, specs: Specs) -> dict[str, dict[str, np.ndarray]]:
    """`{stack: {scaler: array [n_layers, 2]}}` of mean and std per layer, stored values.

    ngpt: `attn.s_qk`, `cross.s_qk`, `s_u`, `s_v` (effective gate scale is `s_uv * sqrt(d)`).
    rmsnorm: the gains `attn_norm`, `cross_norm`, `mlp_norm`. `s_z` is global: see `global_scalers`.
    """
    out: dict[str, dict[str, np.ndarray]] = {s: {} for s in layers(specs)}
    for kind in ("s_qk", "s_uv", "norm_scale"):
        for stack, block, per_layer in _per_layer(specs, kind):
            if kind == "s_uv":
                halves = [split_s_uv(np.asarray(params[s.name])) for s in per_layer]
                out[stack][f"{block}.s_u"] = np.array([_mean_std(u) for u, _ in halves])
                out[stack][f"{block}.s_v"] = np.array([_mean_std(v) for _, v in halves])
            else:
                key = f"{block}_norm" if kind == "norm_scale" else f"{block}.{kind}"
                out[stack][key] = np.array([_mean_std(params[s.name]) for s in per_layer])
    return out


def global_scalers(params, specs: Specs) -> dict[str, np.ndarray]:
    """Scalers outside the layers: `s_z [V]` (ngpt), the final RMSNorm gains (rmsnorm)."""
    return {n: np.asarray(params[n]) for n, s in specs.items()
            if s.kind in SCALER_KINDS and s.layer is None}


def condition_numbers(params, specs: Specs, stacks: dict[str, list[int]] | None = None
                      ) -> dict[str, dict[str, np.ndarray]]:
    """`{stack: {"attn.wq": array [n_layers], ...}}` of condition numbers (NaN for layers skipped
    through `stacks`, a `{stack: [layer indices]}` selection)."""
    n_layers = layers(specs)
    out: dict[str, dict[str, np.ndarray]] = {stack: {} for stack in n_layers}
    for name in matrix_names(specs, stacks):
        s = specs[name]
        table = out[s.stack].setdefault(f"{s.block}.{s.attr}", np.full(n_layers[s.stack], np.nan))
        table[s.layer] = condition_number(params[name])
    return out


@dataclass
class EmbeddingStats:
    norms: np.ndarray
    spectrum: np.ndarray
    cosines: np.ndarray
    summary: dict[str, float] = field(default_factory=dict)


def embedding_stats(params, specs: Specs, max_pairs: int = 200_000, seed: int = 0
                    ) -> dict[str, EmbeddingStats]:
    """Norms, normalized covariance spectrum and pairwise cosines of each embedding matrix."""
    out = {}
    for name in embedding_names(specs):
        x = embedding_rows(specs[name], params[name])
        norms, spec = row_norms(x), covariance_spectrum(x)
        cos = pairwise_cosines(x, max_pairs, seed)
        summary = {"norm_mean": float(norms.mean()), "norm_std": float(norms.std()),
                   "spectrum_max_over_median": float(spec[0]) if len(spec) else float("nan"),
                   "cos_mean": float(cos.mean()) if len(cos) else float("nan"),
                   "cos_std": float(cos.std()) if len(cos) else float("nan")}
        out[name] = EmbeddingStats(norms, spec, cos, summary)
    return out


def key_numbers(params, specs: Specs, cond: dict | None = None, stats: dict | None = None
                ) -> dict[str, float]:
    """A flat summary for a report: mean |alpha| per stack and block, scaler means, mean and max
    condition numbers, embedding norm and cosine spread. `cond` and `stats` reuse the results of
    `condition_numbers` and `embedding_stats` when they were computed already."""
    out: dict[str, float] = {}
    for stack, blocks in eigen_lrs(params, specs).items():
        for block, t in blocks.items():
            out[f"{stack} {block} |alpha| mean"] = float(t[:, 0].mean())
    for stack, table in scalers(params, specs).items():
        for k, t in table.items():
            out[f"{stack} {k} mean"] = float(t[:, 0].mean())
    for n, v in global_scalers(params, specs).items():
        out[f"{n} mean"] = float(np.mean(v))
    for stack, table in (cond if cond is not None else condition_numbers(params, specs)).items():
        if table:
            allc = np.concatenate(list(table.values()))
            out[f"{stack} condition number mean"] = float(np.nanmean(allc))
            out[f"{stack} condition number max"] = float(np.nanmax(allc))
    for n, e in (stats if stats is not None else embedding_stats(params, specs)).items():
        for k, v in e.summary.items():
            out[f"{n} {k}"] = v
    return out
