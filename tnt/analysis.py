"""What a trained TnT holds, computed from its canonical parameters (numpy only, either framework).

Every function takes the flat canonical dict (`tnt/params.py`: `decoder.layers.0.attn.alpha`,
`lm_head` `[d, V]`, ...) as numpy arrays, so a checkpoint of either backend, or a live model's
`backend.arrays(...)`, can be studied the same way. The views follow the nGPT paper's analysis
(Loshchilov et al. 2024, section 4 and appendix): eigen learning rates `|alpha|` per layer, the
scaling factors `s_qk`, `s_u`, `s_v`, `s_z`, condition numbers of the attention and MLP matrices,
and the norms, covariance spectrum and pairwise cosine similarities of the embeddings.

Scalers are reported at their stored value, which docs/design.md fixes as the value the forward pass
uses, except `s_uv`: the forward pass multiplies it by `sqrt(d)` (the effective gate scale is
`s_uv * sqrt(d)`). `s_uv [2F]` splits into `s_u = s_uv[:F]` and `s_v = s_uv[F:]`.

rmsnorm models have no alphas or nGPT scalers; they get the RMSNorm gains (`*_norm.scale`) as their
scalers and every matrix and embedding view.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

ATTN_MATRICES = ("wq", "wk", "wv", "wo")
MLP_MATRICES = ("w_in", "w_out")
BLOCKS = ("attn", "cross", "mlp")
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")


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


def embedding_rows(name: str, w: np.ndarray) -> np.ndarray:
    """The `[V, d]` token vectors of an embedding: `*.embed` as stored, `lm_head` `[d, V]` transposed."""
    return np.asarray(w).T if name == "lm_head" else np.asarray(w)


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
# The model's structure, read from the names


def layers(params) -> dict[str, int]:
    """Number of layers per stack present in `params` (`{"encoder": 2, "decoder": 2}`)."""
    out: dict[str, int] = {}
    for name in params:
        m = _LAYER.match(name)
        if m:
            out[m.group(1)] = max(out.get(m.group(1), 0), int(m.group(2)) + 1)
    return {s: out[s] for s in ("encoder", "decoder") if s in out}


def is_ngpt(params) -> bool:
    return "s_z" in params


def split_s_uv(s_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(s_u, s_v)`: the first and the last F entries of `s_uv [2F]` (docs/design.md, forward pass)."""
    f = len(s_uv) // 2
    return s_uv[:f], s_uv[f:]


def matrix_names(params, stacks: dict[str, list[int]] | None = None) -> list[str]:
    """The attention and MLP matrices present, optionally only for some layers of each stack."""
    out = []
    for stack, n in layers(params).items():
        for i in (stacks or {}).get(stack, range(n)):
            for block in ("attn", "cross"):
                out += [f"{stack}.layers.{i}.{block}.{w}" for w in ATTN_MATRICES
                        if f"{stack}.layers.{i}.{block}.{w}" in params]
            out += [f"{stack}.layers.{i}.mlp.{w}" for w in MLP_MATRICES]
    return [n for n in out if n in params]


def scaler_names(params) -> list[str]:
    """Every scaler vector: alphas, s_qk, s_uv, s_z (ngpt) or the RMSNorm gains (rmsnorm)."""
    keep = (".alpha", ".s_qk", ".s_uv", ".scale")
    return [n for n in params if n == "s_z" or n.endswith(keep)]


def token_params(params, pad_id: int) -> dict[str, np.ndarray]:
    """`params` without the pad id's embedding rows, lm_head column and `s_z` entry: the views
    describe tokens, and the pad is none (never a training input or target; an imported model's
    is an appended placeholder whose logit is 0, docs/design.md "Special ids")."""
    out = dict(params)
    for name in ("encoder.embed", "decoder.embed"):
        if name in out:
            out[name] = np.delete(out[name], pad_id, axis=0)
    out["lm_head"] = np.delete(out["lm_head"], pad_id, axis=1)
    if "s_z" in out:
        out["s_z"] = np.delete(out["s_z"], pad_id)
    return out


def embedding_names(params) -> list[str]:
    return [n for n in ("encoder.embed", "decoder.embed", "lm_head") if n in params]


# ---------------------------------------------------------------------------------------------
# Per-layer tables


def eigen_lrs(params) -> dict[str, dict[str, np.ndarray]]:
    """`{stack: {block: array [n_layers, 2]}}` of `|alpha|` mean and std per layer (ngpt only).

    The eigen learning rates are `|alpha|` (the forward pass uses `abs(alpha)`, docs/design.md)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for stack, n in layers(params).items():
        for block in BLOCKS:
            names = [f"{stack}.layers.{i}.{block}.alpha" for i in range(n)]
            if all(k in params for k in names):
                a = [np.abs(np.asarray(params[k], np.float64)) for k in names]
                out.setdefault(stack, {})[block] = np.array([[x.mean(), x.std()] for x in a])
    return out


def scalers(params) -> dict[str, dict[str, np.ndarray]]:
    """`{stack: {scaler: array [n_layers, 2]}}` of mean and std per layer, stored values.

    ngpt: `attn.s_qk`, `cross.s_qk`, `s_u`, `s_v` (effective gate scale is `s_uv * sqrt(d)`).
    rmsnorm: the gains `attn_norm`, `cross_norm`, `mlp_norm`. `s_z` is global: see `global_scalers`.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for stack, n in layers(params).items():
        rows: dict[str, list] = {}
        for i in range(n):
            p = f"{stack}.layers.{i}"
            found = {}
            for block in ("attn", "cross"):
                if f"{p}.{block}.s_qk" in params:
                    found[f"{block}.s_qk"] = params[f"{p}.{block}.s_qk"]
            if f"{p}.mlp.s_uv" in params:
                found["mlp.s_u"], found["mlp.s_v"] = split_s_uv(np.asarray(params[f"{p}.mlp.s_uv"]))
            for g in ("attn_norm", "cross_norm", "mlp_norm"):
                if f"{p}.{g}.scale" in params:
                    found[g] = params[f"{p}.{g}.scale"]
            for k, v in found.items():
                v = np.asarray(v, np.float64)
                rows.setdefault(k, []).append([v.mean(), v.std()])
        out[stack] = {k: np.array(v) for k, v in rows.items() if len(v) == n}
    return out


def global_scalers(params) -> dict[str, np.ndarray]:
    """Scalers outside the layers: `s_z [V]` (ngpt), the final RMSNorm gains (rmsnorm)."""
    names = ("s_z", "encoder.final_norm.scale", "decoder.final_norm.scale")
    return {n: np.asarray(params[n]) for n in names if n in params}


def condition_numbers(params, stacks: dict[str, list[int]] | None = None
                      ) -> dict[str, dict[str, np.ndarray]]:
    """`{stack: {"attn.wq": array [n_layers], ...}}` of condition numbers (NaN for layers skipped
    through `stacks`, a `{stack: [layer indices]}` selection)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for stack, n in layers(params).items():
        table: dict[str, np.ndarray] = {}
        for name in matrix_names(params, stacks):
            if not name.startswith(stack + "."):
                continue
            i = int(_LAYER.match(name).group(2))
            key = name.split(".", 3)[3]  # "attn.wq"
            table.setdefault(key, np.full(n, np.nan))[i] = condition_number(params[name])
        out[stack] = table
    return out


@dataclass
class EmbeddingStats:
    norms: np.ndarray
    spectrum: np.ndarray
    cosines: np.ndarray
    summary: dict[str, float] = field(default_factory=dict)


def embedding_stats(params, max_pairs: int = 200_000, seed: int = 0) -> dict[str, EmbeddingStats]:
    """Norms, normalized covariance spectrum and pairwise cosines of each embedding matrix."""
    out = {}
    for name in embedding_names(params):
        x = embedding_rows(name, params[name])
        norms, spec = row_norms(x), covariance_spectrum(x)
        cos = pairwise_cosines(x, max_pairs, seed)
        summary = {"norm_mean": float(norms.mean()), "norm_std": float(norms.std()),
                   "spectrum_max_over_median": float(spec[0]) if len(spec) else float("nan"),
                   "cos_mean": float(cos.mean()) if len(cos) else float("nan"),
                   "cos_std": float(cos.std()) if len(cos) else float("nan")}
        out[name] = EmbeddingStats(norms, spec, cos, summary)
    return out


def key_numbers(params, cond: dict | None = None, stats: dict | None = None) -> dict[str, float]:
    """A flat summary for a report: mean |alpha| per stack and block, scaler means, mean and max
    condition numbers, embedding norm and cosine spread. `cond` and `stats` reuse the results of
    `condition_numbers(params)` and `embedding_stats(params)` when they were computed already."""
    out: dict[str, float] = {}
    for stack, blocks in eigen_lrs(params).items():
        for block, t in blocks.items():
            out[f"{stack} {block} |alpha| mean"] = float(t[:, 0].mean())
    for stack, table in scalers(params).items():
        for k, t in table.items():
            out[f"{stack} {k} mean"] = float(t[:, 0].mean())
    for n, v in global_scalers(params).items():
        out[f"{n} mean"] = float(np.mean(v))
    for stack, table in (cond if cond is not None else condition_numbers(params)).items():
        if table:
            allc = np.concatenate(list(table.values()))
            out[f"{stack} condition number mean"] = float(np.nanmean(allc))
            out[f"{stack} condition number max"] = float(np.nanmax(allc))
    for n, e in (stats if stats is not None else embedding_stats(params)).items():
        for k, v in e.summary.items():
            out[f"{n} {k}"] = v
    return out
