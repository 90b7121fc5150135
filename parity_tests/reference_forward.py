"""An independent numpy forward pass of the public nGPT reference model (NVIDIA/ngpt model.py,
decoder-only, SwiGLU, causal, bias-free), written from its published math in float64 so that
importing its weights can be checked against what that code computes, not against TnT itself.
Scalers are in the reference's storage (multiplied by init/scale here, as it does)."""

from __future__ import annotations

import math

import numpy as np

from tnt.rope import reference_tables


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _their_rope(x_BxHxTxK, sin_half, cos_half):
    """The reference's transform: pairs (-x[2i+1], x[2i]) times (cos_half[i], sin_half[i])."""
    rot = np.stack((-x_BxHxTxK[..., 1::2], x_BxHxTxK[..., ::2]), axis=-1)
    return (rot * np.stack((cos_half, sin_half), axis=-1)).reshape(x_BxHxTxK.shape)


def reference_logits(state: dict[str, np.ndarray], idx_BxT: np.ndarray, n_heads: int,
                     base_scale: float) -> np.ndarray:
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    ngpt = "sz" in s
    h = s["transformer.wte.weight"][idx_BxT]
    B, T, C = h.shape
    dh = C // n_heads
    sin_half, cos_half = reference_tables(T, dh, 10000.0)
    n_layers = len({k.split(".")[2] for k in s if k.startswith("transformer.h.")})
    causal = np.tril(np.ones((T, T), bool))
    for i in range(n_layers):
        p = lambda n, i=i: s[f"transformer.h.{i}.{n}"]  # noqa: E731
        hin = h if ngpt else _rms(h, p("rmsnorm_att.weight"))
        heads = lambda t: t.reshape(B, T, n_heads, dh).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (heads(hin @ p(f"{n}.weight").T) for n in ("query", "key", "value"))
        q, k = _their_rope(q, sin_half, cos_half), _their_rope(k, sin_half, cos_half)
        if ngpt:
            sqk = (p("sqk") * (1.0 / base_scale)).reshape(n_heads, 1, dh)
            q, k = sqk * _unit(q), sqk * _unit(k)
            scale = math.sqrt(dh)
        else:
            scale = 1.0 / math.sqrt(dh)
        att = np.where(causal, q @ k.transpose(0, 1, 3, 2) * scale, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v
        h_att = y.transpose(0, 2, 1, 3).reshape(B, T, C) @ p("att_c_proj.weight").T
        if ngpt:
            lr = np.abs(p("attn_alpha") * (0.05 / base_scale))
            a, b = _unit(h), _unit(h_att)
            h = _unit(a + lr * (b - a))
        else:
            h = h + h_att
        hin = h if ngpt else _rms(h, p("rmsnorm_mlp.weight"))
        uv = hin @ p("c_fc.weight").T
        if ngpt:
            uv = uv * (p("suv") * math.sqrt(C))
        u, v = np.split(uv, 2, axis=-1)
        h_mlp = (u * (v / (1 + np.exp(-v)))) @ p("mlp_c_proj.weight").T
        if ngpt:
            lr = np.abs(p("mlp_alpha") * (0.05 / base_scale))
            a, b = _unit(h), _unit(h_mlp)
            h = _unit(a + lr * (b - a))
        else:
            h = h + h_mlp
    if not ngpt:
        h = _rms(h, s["rmsnorm_f.weight"])
    logits = h @ s["lm_head.weight"].T
    return logits * (s["sz"] * (1.0 / base_scale)) if ngpt else logits


def random_reference_state(vocab: int, d: int, n_layers: int, ngpt: bool,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """A reference-shaped state dict with random weights (unit rows for nGPT, as the reference's
    `normalize_matrices` leaves them) and scalers moved away from their init."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / math.sqrt(d)

    def mat(out, inp, axis):
        w = rng.normal(0, scale, (out, inp)).astype(np.float32)
        return (w / np.linalg.norm(w, axis=axis, keepdims=True)) if ngpt else w

    def vec(n, around):
        return (around * (1 + 0.3 * rng.standard_normal(n))).astype(np.float32)

    st = {"transformer.wte.weight": mat(vocab, d, 1), "lm_head.weight": mat(vocab, d, 1)}
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        for n in ("query", "key", "value"):
            st[p + n + ".weight"] = mat(d, d, 1)
        st[p + "att_c_proj.weight"] = mat(d, d, 0)
        st[p + "c_fc.weight"] = mat(8 * d, d, 1)
        st[p + "mlp_c_proj.weight"] = mat(d, 4 * d, 0)
        if ngpt:
            st[p + "attn_alpha"], st[p + "mlp_alpha"] = vec(d, scale), vec(d, scale)
            st[p + "sqk"], st[p + "suv"] = vec(d, scale), vec(8 * d, 1.0)
        else:
            st[p + "rmsnorm_att.weight"], st[p + "rmsnorm_mlp.weight"] = vec(d, 1.0), vec(d, 1.0)
    if ngpt:
        st["sz"] = vec(vocab, scale)
    else:
        st["rmsnorm_f.weight"] = vec(d, 1.0)
    return st
