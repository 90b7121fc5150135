"""Canonical parameter names, shapes, structure and per-parameter rules (docs/design.md, "Parameters").

This is the single table both frameworks read: which names exist for a config, their `[in, out]`
shapes, where each sits in the model (stack, layer, block), what it is (`kind`), the logical name
of each of its axes, how it is initialized, along which axis the unit-norm projection acts, the
eigen learning-rate multiplier `init/scale`, and whether weight decay applies. Code that needs the
structure (sharding, analysis, optimizer masks, the reference import) reads these fields, never
the name strings, so a new parameter is one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tnt.config import ModelConfig

ALPHA_INIT = 0.05

# What a parameter is: the embedding of a stack `[V, d]`, an attention or MLP `matrix`, the
# output `lm_head` `[d, V]`, an nGPT scaler, or an RMSNorm gain.
KINDS = ("embed", "matrix", "lm_head", "alpha", "s_qk", "s_uv", "s_z", "norm_scale")
SCALER_KINDS = ("alpha", "s_qk", "s_uv", "s_z", "norm_scale")
# Logical axes (the sharding rules table in tnt_jax/sharding.py maps them to mesh axes): the
# vocabulary, d_model of a matrix, the attention heads (H * dh), the MLP hidden axis, and d_model
# of a vector that scales the residual stream (alpha, RMSNorm gains).
AXES = ("vocab", "embed", "heads", "mlp", "stream")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: `name` is `[stack.layers.<layer>.][block.]attr`, joined from the fields."""

    name: str
    shape: tuple[int, ...]
    kind: str
    axes: tuple[str, ...]  # the logical name of each array axis
    stack: str | None = None  # "encoder", "decoder", or None for lm_head and s_z
    layer: int | None = None
    block: str | None = None  # "attn", "cross" or "mlp" (an RMSNorm gain: the block it feeds)
    attr: str = ""  # the module attribute holding it: "wq", "alpha", "scale", ...
    init_std: float | None = None  # normal(0, std); None means constant `init_value`
    init_value: float = 0.0
    project_axis: int | None = None  # axis holding d_model, for the ngpt unit-norm projection
    eigen_lr: float = 1.0  # update multiplier init/scale (docs/design.md, eigen learning rates)
    base_scaled: bool = False  # its eigen-LR `scale` is the base scale 1/sqrt(d) (design table)
    weight_decay: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if len(self.axes) != len(self.shape) or not set(self.axes) <= set(AXES):
            raise ValueError(f"parameter {self.name}: axes {self.axes} do not name the "
                             f"{len(self.shape)} axes of shape {self.shape} from {AXES}")

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter of a model with this config, in canonical order."""
    d, V, F = cfg.d_model, cfg.vocab_size, cfg.hidden
    ngpt = cfg.norm == "ngpt"
    std = cfg.init_scale
    inv = math.sqrt(d)  # 1 / (1/sqrt(d)): the multiplier of s_qk and s_z; alpha's is 0.05*sqrt(d)
    specs: list[ParamSpec] = []

    def add(where: dict, attr: str, shape: tuple[int, ...], kind: str, axes: tuple[str, ...], **rules):
        path = [where.get("stack"), *(("layers", str(where["layer"])) if "layer" in where else ()),
                where.get("module"), attr]
        specs.append(ParamSpec(".".join(p for p in path if p), shape, kind, axes,
                               where.get("stack"), where.get("layer"), where.get("block"), attr,
                               **rules))

    def matrix(where: dict, attr: str, axes: tuple[str, str], shape: tuple[int, int],
               kind: str = "matrix", out_std: float | None = None):
        add(where, attr, shape, kind, axes, init_std=out_std or std,
            project_axis=axes.index("embed") if ngpt else None, weight_decay=not ngpt)

    def scaler(where: dict, attr: str, size: int, axis: str, kind: str, value: float,
               base_scaled: bool = False):
        add(where, attr, (size,), kind, (axis,), init_value=value, base_scaled=base_scaled,
            eigen_lr=value * inv if base_scaled else 1.0)

    def attention(where: dict, n_layers: int):
        out_std = None if ngpt else std / math.sqrt(2 * n_layers)
        for w in ("wq", "wk", "wv"):
            matrix(where, w, ("embed", "heads"), (d, d))
        matrix(where, "wo", ("heads", "embed"), (d, d), out_std=out_std)
        if ngpt:
            scaler(where, "alpha", d, "stream", "alpha", ALPHA_INIT, base_scaled=True)
            scaler(where, "s_qk", d, "heads", "s_qk", 1.0, base_scaled=True)

    def mlp(where: dict, n_layers: int):
        matrix(where, "w_in", ("embed", "mlp"), (d, 2 * F))
        matrix(where, "w_out", ("mlp", "embed"), (F, d),
               out_std=None if ngpt else std / math.sqrt(2 * n_layers))
        if ngpt:
            scaler(where, "alpha", d, "stream", "alpha", ALPHA_INIT, base_scaled=True)
            scaler(where, "s_uv", 2 * F, "mlp", "s_uv", 1.0)

    def norm(where: dict, module: str):
        if not ngpt:
            scaler({**where, "module": module}, "scale", d, "stream", "norm_scale", 1.0)

    def stack(name: str, n_layers: int, cross: bool):
        matrix({"stack": name}, "embed", ("vocab", "embed"), (V, d), kind="embed")
        for i in range(n_layers):
            layer = {"stack": name, "layer": i}
            blocks = ("attn", "cross", "mlp") if cross else ("attn", "mlp")
            for block in blocks:
                where = {**layer, "block": block}
                norm(where, f"{block}_norm")
                where["module"] = block
                (mlp if block == "mlp" else attention)(where, n_layers)
        norm({"stack": name}, "final_norm")

    if cfg.has_encoder:
        stack("encoder", cfg.n_encoder_layers, cross=False)
    stack("decoder", cfg.n_decoder_layers, cross=cfg.has_encoder)
    matrix({}, "lm_head", ("embed", "vocab"), (d, V), kind="lm_head")
    if ngpt:
        scaler({}, "s_z", V, "vocab", "s_z", 1.0, base_scaled=True)
    return {s.name: s for s in specs}


def check_names(names: Iterable[str], cfg: ModelConfig, what: str = "parameters",
                suffixes: tuple[str, ...] = ("",)) -> None:
    """Raise a KeyError naming the missing and the unexpected names of `what`: the one check of
    names against a config (parameters of models and checkpoints; with `suffixes`, the per-parameter
    entries of an optimizer state, `<name><suffix>`)."""
    names = list(names)
    expected = [n + sfx for n in param_specs(cfg) for sfx in suffixes]
    given, known = set(names), set(expected)
    missing = [n for n in expected if n not in given]
    extra = [n for n in names if n not in known]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if extra:
            parts.append(f"unexpected: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
        raise KeyError(f"{what} do not match the config ({cfg.arch}, {cfg.norm}): "
                       + "; ".join(parts))


def check_canonical(params: dict[str, object], cfg: ModelConfig) -> None:
    """Raise a KeyError/ValueError naming every missing, extra or mis-shaped parameter."""
    check_names(params, cfg)
    for name, spec in param_specs(cfg).items():
        shape = tuple(np.shape(params[name]))
        if shape != spec.shape:
            raise ValueError(f"parameter {name} has shape {shape}, expected {spec.shape}")


def unit_norm(x: np.ndarray, axis: int) -> np.ndarray:
    """`x / ||x||` along `axis` in numpy (the reference for tests and analysis)."""
    n = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=True))
    return (x / np.maximum(n, 1e-12)).astype(x.dtype)
