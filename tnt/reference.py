"""Import weights trained with the public nGPT reference code (NVIDIA/ngpt, decoder-only).

The reference names its parameters `transformer.wte.weight`, `transformer.h.{i}.{query,key,value,
att_c_proj,c_fc,mlp_c_proj}.weight` (`nn.Linear`, `[out, in]`), `transformer.h.{i}.{attn_alpha,
mlp_alpha,sqk,suv}`, `lm_head.weight`, `sz` (nGPT), or `rmsnorm_att/rmsnorm_mlp/rmsnorm_f.weight`
(its baseline). It stores each scaler at a small value and multiplies it by `init/scale` in the
forward; TnT stores the effective value (docs/design.md), so importing converts
`effective = stored * init/scale` (alpha: 0.05/base_scale; sqk, sz: 1/base_scale; suv: 1) and
transposes every matrix to `[in, out]`.

The reference's position transform is not a rotation; the imported config therefore sets
`rope_mode="ngpt_reference"` (see `tnt.rope`) so the model computes what it was trained with.
Pass `rope_mode="rotate"` to get TnT's correct RoPE instead (the weights then need fine-tuning).

Every source id stays a real token (docs/design.md, "Special ids"): the imported model has
`vocab_size = V + 1`, and its pad is the appended id V, whose embedding row is a unit vector and
whose logit is 0 at import (a zero lm_head column for the baseline, `s_z[V] = 0` for nGPT, whose
lm_head columns stay unit). Generation never emits it and the loss's softmax leaves it out, so
continued training is the reference's softmax over V. bos and eos are given
(see `tnt.special_ids.resolve_import_ids`), or None.
"""

from __future__ import annotations

import math
import re

import numpy as np

from tnt.config import ModelConfig
from tnt.params import ParamSpec, check_canonical, param_specs


def _strip(name: str) -> str:
    """Drop the prefixes torch.compile / DDP add (`_orig_mod.`, `module.`)."""
    return re.sub(r"^(_orig_mod\.|module\.)+", "", name)


def convert_reference(state: dict[str, np.ndarray], n_heads: int, base_scale: float | None = None,
                      rope_mode: str = "ngpt_reference", max_len: int = 1024,
                      bos_id: int | None = None, eos_id: int | None = None
                      ) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """(canonical params, ModelConfig) from a reference state dict (arrays as numpy float32).

    `base_scale` is the reference config's `base_scale` (default 1/sqrt(n_embd)); `n_heads` and
    `max_len` (its `block_size`) are not recoverable from the weights, so they are asked for.
    """
    state = {_strip(k): np.asarray(v, np.float32) for k, v in state.items()}
    if "transformer.wte.weight" not in state:
        raise KeyError("not an nGPT reference state dict: no transformer.wte.weight")
    vocab, d = state["transformer.wte.weight"].shape
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise KeyError(f"reference layers must be numbered 0..n-1, found {layers[:8]}")
    ngpt = "sz" in state
    scale = base_scale if base_scale is not None else 1.0 / math.sqrt(d)
    hidden = state["transformer.h.0.c_fc.weight"].shape[0] // 2
    cfg = ModelConfig(arch="decoder_only", norm="ngpt" if ngpt else "rmsnorm",
                      vocab_size=vocab + 1, d_model=d, n_heads=n_heads,
                      n_decoder_layers=len(layers), mlp_hidden=hidden, activation="silu",
                      max_len_encoder=max_len, max_len_decoder=max_len, rope_mode=rope_mode,
                      base_scale=scale, pad_id=vocab, bos_id=bos_id, eos_id=eos_id)
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise KeyError(f"reference state dict lacks {name}")
        used.add(name)
        return state[name]

    out = {}
    for name, spec in param_specs(cfg).items():
        value = take(_reference_name(spec))
        if spec.is_matrix and spec.kind != "embed":  # nn.Linear's [out, in] -> [in, out]
            value = value.T
        # a scaler whose eigen LR is init/base_scale is stored by the reference at effective/that
        out[name] = value * (spec.init_value / scale) if spec.base_scaled else value
    unused = sorted(set(state) - used)
    if unused:
        raise KeyError(f"reference state dict has names TnT does not know: {', '.join(unused[:8])}")
    out = {k: np.ascontiguousarray(v, np.float32) for k, v in _append_pad(out, ngpt).items()}
    check_canonical(out, cfg)
    return out, cfg


# The reference's module names for TnT's (block, attr) of a layer's matrices and RMSNorm gains
_LINEAR = {("attn", "wq"): "query", ("attn", "wk"): "key", ("attn", "wv"): "value",
           ("attn", "wo"): "att_c_proj", ("mlp", "w_in"): "c_fc", ("mlp", "w_out"): "mlp_c_proj"}
_RMSNORM = {"attn": "rmsnorm_att", "mlp": "rmsnorm_mlp", None: "rmsnorm_f"}


def _reference_name(spec: ParamSpec) -> str:
    """The reference state dict's name of a (decoder-only) TnT parameter."""
    layer = f"transformer.h.{spec.layer}"
    return {"embed": "transformer.wte.weight", "lm_head": "lm_head.weight", "s_z": "sz",
            "matrix": f"{layer}.{_LINEAR.get((spec.block, spec.attr))}.weight",
            "alpha": f"{layer}.{spec.block}_alpha", "s_qk": f"{layer}.sqk", "s_uv": f"{layer}.suv",
            "norm_scale": (f"{layer}." if spec.layer is not None else "")
            + f"{_RMSNORM[spec.block]}.weight"}[spec.kind]


def _append_pad(out: dict[str, np.ndarray], ngpt: bool) -> dict[str, np.ndarray]:
    """The pad id V: a unit embedding row (finite and, for nGPT, on the sphere like the others)
    and a logit of exactly 0 (nGPT: a unit lm_head column scaled by s_z = 0; baseline: a zero
    column), so no source id's computation changes."""
    d = out["decoder.embed"].shape[1]
    unit = np.zeros((1, d), np.float32)
    unit[0, 0] = 1.0
    out = dict(out, **{"decoder.embed": np.concatenate([out["decoder.embed"], unit]),
                       "lm_head": np.concatenate([out["lm_head"], unit.T if ngpt else 0 * unit.T],
                                                 axis=1)})
    if ngpt:
        out["s_z"] = np.concatenate([out["s_z"], np.zeros(1, np.float32)])
    return out
