"""Canonical parameter names, shapes and per-parameter rules (docs/design.md, "Parameters").

This is the single table both frameworks read: which names exist for a config, their `[in, out]`
shapes, how each is initialized, along which axis the unit-norm projection acts, the eigen
learning-rate multiplier `init/scale`, and whether weight decay applies. Keeping the rules here
means `tnt_jax` and `tnt_torch` cannot drift apart on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tnt.config import ModelConfig

ALPHA_INIT = 0.05


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    init_std: float | None  # normal(0, std); None means constant `init_value`
    init_value: float = 0.0
    project_axis: int | None = None  # axis holding d_model, for the ngpt unit-norm projection
    eigen_lr: float = 1.0  # update multiplier init/scale (docs/design.md, eigen learning rates)
    weight_decay: bool = False

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

    def matrix(name: str, shape: tuple[int, int], d_axis: int, out_std: float | None = None):
        specs.append(ParamSpec(name, shape, out_std or std, project_axis=d_axis if ngpt else None,
                               weight_decay=not ngpt))

    def vector(name: str, size: int, value: float, eigen_lr: float = 1.0):
        specs.append(ParamSpec(name, (size,), None, value, eigen_lr=eigen_lr))

    def attention(prefix: str, n_layers: int):
        out_std = None if ngpt else std / math.sqrt(2 * n_layers)
        for w in ("wq", "wk", "wv"):
            matrix(f"{prefix}.{w}", (d, d), 0)
        matrix(f"{prefix}.wo", (d, d), 1, out_std)
        if ngpt:
            vector(f"{prefix}.alpha", d, ALPHA_INIT, ALPHA_INIT * inv)
            vector(f"{prefix}.s_qk", d, 1.0, inv)

    def mlp(prefix: str, n_layers: int):
        matrix(f"{prefix}.w_in", (d, 2 * F), 0)
        matrix(f"{prefix}.w_out", (F, d), 1, None if ngpt else std / math.sqrt(2 * n_layers))
        if ngpt:
            vector(f"{prefix}.alpha", d, ALPHA_INIT, ALPHA_INIT * inv)
            vector(f"{prefix}.s_uv", 2 * F, 1.0, 1.0)

    def stack(name: str, n_layers: int, cross: bool):
        matrix(f"{name}.embed", (V, d), 1)
        for i in range(n_layers):
            p = f"{name}.layers.{i}"
            if not ngpt:
                vector(f"{p}.attn_norm.scale", d, 1.0)
            attention(f"{p}.attn", n_layers)
            if cross:
                if not ngpt:
                    vector(f"{p}.cross_norm.scale", d, 1.0)
                attention(f"{p}.cross", n_layers)
            if not ngpt:
                vector(f"{p}.mlp_norm.scale", d, 1.0)
            mlp(f"{p}.mlp", n_layers)
        if not ngpt:
            vector(f"{name}.final_norm.scale", d, 1.0)

    if cfg.has_encoder:
        stack("encoder", cfg.n_encoder_layers, cross=False)
    stack("decoder", cfg.n_decoder_layers, cross=cfg.has_encoder)
    matrix("lm_head", (d, V), 0)
    if ngpt:
        vector("s_z", V, 1.0, inv)
    return {s.name: s for s in specs}


def check_canonical(params: dict[str, object], cfg: ModelConfig) -> None:
    """Raise a KeyError/ValueError naming every missing, extra or mis-shaped parameter."""
    specs = param_specs(cfg)
    missing = [n for n in specs if n not in params]
    extra = [n for n in params if n not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if extra:
            parts.append(f"unexpected: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
        raise KeyError(f"parameters do not match the config ({cfg.arch}, {cfg.norm}): "
                       + "; ".join(parts))
    for name, spec in specs.items():
        shape = tuple(np.shape(params[name]))
        if shape != spec.shape:
            raise ValueError(f"parameter {name} has shape {shape}, expected {spec.shape}")


def unit_norm(x: np.ndarray, axis: int) -> np.ndarray:
    """`x / ||x||` along `axis` in numpy (the reference for tests and analysis)."""
    n = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=True))
    return (x / np.maximum(n, 1e-12)).astype(x.dtype)
