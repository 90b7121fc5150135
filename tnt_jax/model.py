"""The TnT model in Flax NNX: encoder-decoder or decoder-only, nGPT or pre-norm RMSNorm.

Reads top to bottom like docs/design.md, "Forward pass". Every parameter is created from the shared
table `tnt.params.param_specs`, so names, shapes, init and the unit-norm rule are the ones the
torch port uses too. Module attribute paths *are* the canonical names
(`decoder.layers.0.attn.wq`), which makes export and import a flatten and a join.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnt.config import ModelConfig
from tnt.data import check_token_ids
from tnt.params import ParamSpec, check_canonical, param_specs
from tnt.rope import reference_swap_table, rotate_half_tables


def l2norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / max(||x||, 1e-12)` along `axis` (torch's F.normalize, so both sides agree)."""
    return _l2norm(x, axis)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _l2norm(x: jax.Array, axis: int) -> jax.Array:
    return _l2norm_fwd(x, axis)[0]


def _l2norm_fwd(x: jax.Array, axis: int):
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    inv_norm = jax.lax.rsqrt(jnp.maximum(sq, 1e-24))
    y = x * inv_norm
    return y, (y, inv_norm, sq >= 1e-24)


def _l2norm_bwd(axis: int, residuals, g: jax.Array) -> tuple[jax.Array]:
    """`(g - y <g, y>) / ||x||`: the gradient autodiff finds, in one reduction and one pass (the
    normalizations are a large share of nGPT's extra cost). Where the norm was clamped, the
    function is linear and the gradient is `g / 1e-12`."""
    y, inv_norm, unclamped = residuals
    radial = jnp.where(unclamped, jnp.sum(g * y, axis=axis, keepdims=True), 0.0)
    return (inv_norm * (g - radial * y),)


_l2norm.defvjp(_l2norm_fwd, _l2norm_bwd)


@jax.custom_vjp
def unit_norm(h: jax.Array) -> jax.Array:
    """docs/design.md's `norm(h)` of a vector already on the unit sphere (the residual stream:
    embedding rows after the projection, every block's output): the value is `h` as is, the
    gradient is `l2norm`'s, `g - h <h, g>` (its `/ ||h||` is 1 there). Computing `h / ||h||`
    would change the value only by float round-off; the graph is what matters: without this op
    the radial part of the cotangent would reach `h`, and the gradients would not be the
    reference's. The caller guarantees the unit norm (a non-unit `h` passes through unscaled)."""
    return h


def _unit_norm_bwd(h: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (g - h * jnp.sum(g * h, axis=-1, keepdims=True),)


unit_norm.defvjp(lambda h: (h, h), _unit_norm_bwd)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def rope_tables(length: int, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [L, dh/2] for frequencies base^(-2i/dh), positions 0..L-1 (`tnt.rope`)."""
    cos, sin = rotate_half_tables(length, head_dim, base)
    return jnp.asarray(cos), jnp.asarray(sin)


def apply_rope(x_BxLxHxK: jax.Array, cos_LxK2: jax.Array, sin_LxK2: jax.Array) -> jax.Array:
    """Rotate pairs (x[i], x[i + dh/2]) by angle pos * freq_i (the "rotate half" convention)."""
    x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
    cos, sin = cos_LxK2[None, :, None, :], sin_LxK2[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_reference_rope(x_BxLxHxK: jax.Array, table_LxK: jax.Array) -> jax.Array:
    """`rope_mode="ngpt_reference"`, for imported checkpoints only: the public nGPT code's
    transform (not a rotation, NVIDIA/ngpt#10), `swap_pairs(x) * T` with `T` from
    `tnt.rope.reference_swap_table`."""
    pairs = x_BxLxHxK.reshape(*x_BxLxHxK.shape[:-1], -1, 2)[..., ::-1]
    return pairs.reshape(x_BxLxHxK.shape) * table_LxK[None, :, None, :]


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU `x/2 (1 + erf(x/sqrt 2))`, torch's formula. `jax.nn.gelu(approximate=False)`
    computes the same function through erfc, which is markedly slower on the CPU."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@jax.custom_vjp
def split_halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x[..., :n], x[..., n:]` for n = half the last axis. The gradient is the concatenation of
    the two cotangents (XLA would build it as pad + pad + add, a third more memory traffic)."""
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


split_halves.defvjp(lambda x: (split_halves(x), None),
                    lambda _, cotangents: (jnp.concatenate(cotangents, axis=-1),))


def attend(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxLxS, scale: float) -> jax.Array:
    """Softmax attention; a query row whose keys are all masked outputs exactly 0 (docs/design.md).

    Cheaper on the [B, H, L, S] scores than the textbook order, same math: the scale multiplies
    q (L*dh numbers, not L*S), and the softmax's division is applied to the output
    (`(exp(s - max) @ v) / sum exp(s - max)`, L*dh divisions, not L*S). Masked scores are set
    to the float minimum, so a fully masked row is a uniform softmax, zeroed on the output.
    """
    scores = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK * scale, k_BxSxHxK)
    scores = jnp.where(mask_BxLxS[:, None], scores, jnp.finfo(scores.dtype).min)
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total_BxLxHx1 = jnp.moveaxis(jnp.sum(weights, axis=-1), 1, 2)[..., None]
    y_BxLxHxK = jnp.einsum("bhls,bshk->blhk", weights, v_BxSxHxK) / total_BxLxHx1
    has_key_BxLx1x1 = jnp.any(mask_BxLxS, axis=-1)[:, :, None, None]
    return jnp.where(has_key_BxLx1x1, y_BxLxHxK, 0.0)


def _param(specs: dict[str, ParamSpec], name: str, rngs: nnx.Rngs) -> nnx.Param:
    """Initialize one parameter from the shared table (ngpt matrices start on the unit sphere)."""
    spec = specs[name]
    if spec.init_std is None:
        return nnx.Param(jnp.full(spec.shape, spec.init_value, jnp.float32))
    value = spec.init_std * jax.random.normal(rngs.params(), spec.shape, jnp.float32)
    if spec.project_axis is not None:
        value = l2norm(value, spec.project_axis)
    return nnx.Param(value)


class Attention(nnx.Module):
    """Multi-head attention; with ngpt, q and k are unit-normalized per head and scaled by s_qk."""

    def __init__(self, cfg: ModelConfig, specs, prefix: str, rngs: nnx.Rngs, rope: bool):
        self.n_heads, self.head_dim, self.rope = cfg.n_heads, cfg.head_dim, rope
        self.ngpt = cfg.norm == "ngpt"
        for w in ("wq", "wk", "wv", "wo"):
            setattr(self, w, _param(specs, f"{prefix}.{w}", rngs))
        if self.ngpt:
            self.alpha = _param(specs, f"{prefix}.alpha", rngs)
            self.s_qk = _param(specs, f"{prefix}.s_qk", rngs)

    def __call__(self, x_BxLxD, kv_BxSxD, mask_BxLxS, rope_tables=None) -> jax.Array:
        B, L, D = x_BxLxD.shape
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.n_heads, self.head_dim)  # noqa: E731
        q = heads(x_BxLxD @ self.wq[...])
        k = heads(kv_BxSxD @ self.wk[...])
        v = heads(kv_BxSxD @ self.wv[...])
        if self.rope:
            cos, sin = rope_tables
            S = k.shape[1]
            if cos is None:  # rope_mode="ngpt_reference": `sin` holds the reference's table
                q, k = apply_reference_rope(q, sin[:L]), apply_reference_rope(k, sin[:S])
            else:
                q, k = apply_rope(q, cos[:L], sin[:L]), apply_rope(k, cos[:S], sin[:S])
        if self.ngpt:
            s_qk = self.s_qk[...].reshape(self.n_heads, self.head_dim)
            q, k = s_qk * l2norm(q), s_qk * l2norm(k)
            scale = math.sqrt(self.head_dim)
        else:
            scale = 1.0 / math.sqrt(self.head_dim)
        y = attend(q, k, v, mask_BxLxS, scale)
        return y.reshape(B, L, D) @ self.wo[...]


class MLP(nnx.Module):
    """Gated MLP `(u * act(v)) @ w_out` with `[u, v] = x @ w_in` (ngpt scales uv by s_uv*sqrt(d))."""

    def __init__(self, cfg: ModelConfig, specs, prefix: str, rngs: nnx.Rngs):
        self.ngpt, self.hidden, self.d_model = cfg.norm == "ngpt", cfg.hidden, cfg.d_model
        self.activation = cfg.activation
        self.w_in = _param(specs, f"{prefix}.w_in", rngs)
        self.w_out = _param(specs, f"{prefix}.w_out", rngs)
        if self.ngpt:
            self.alpha = _param(specs, f"{prefix}.alpha", rngs)
            self.s_uv = _param(specs, f"{prefix}.s_uv", rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        w_in = self.w_in[...]
        if self.ngpt:  # (x @ w) * s == x @ (w * s) for a per-column s: scale d*2F, not B*L*2F
            w_in = w_in * (self.s_uv[...] * math.sqrt(self.d_model))
        u, v = split_halves(x_BxLxD @ w_in)
        act = gelu(v) if self.activation == "gelu" else jax.nn.silu(v)
        return (u * act) @ self.w_out[...]


class Scale(nnx.Module):
    """An RMSNorm's learned scale (the rmsnorm baseline only)."""

    def __init__(self, specs, prefix: str, rngs: nnx.Rngs):
        self.scale = _param(specs, f"{prefix}.scale", rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...])


class Block(nnx.Module):
    """Self-attention, optional cross-attention, MLP, each joined to the stream by the residual
    update of the norm: nGPT's `norm(norm(h) + |alpha| (norm(f) - norm(h)))`, or the
    pre-norm `h + f(rmsnorm(h))`.

    With ngpt the input `h` is unit-norm (an embedding row, or the previous update's output), so
    docs/design.md's inner `norm(h)` is `unit_norm(h)`: no arithmetic forward, the normalization's
    gradient backward. The sublayer reads `h` itself, as in the design and the nGPT reference.
    """

    def __init__(self, cfg: ModelConfig, specs, prefix: str, rngs: nnx.Rngs, cross: bool):
        self.ngpt = cfg.norm == "ngpt"
        self.attn = Attention(cfg, specs, f"{prefix}.attn", rngs, rope=True)
        self.cross = Attention(cfg, specs, f"{prefix}.cross", rngs, rope=False) if cross else None
        self.mlp = MLP(cfg, specs, f"{prefix}.mlp", rngs)
        if not self.ngpt:
            self.attn_norm = Scale(specs, f"{prefix}.attn_norm", rngs)
            self.cross_norm = Scale(specs, f"{prefix}.cross_norm", rngs) if cross else None
            self.mlp_norm = Scale(specs, f"{prefix}.mlp_norm", rngs)

    def __call__(self, h, self_mask, rope, enc=None, cross_mask=None) -> jax.Array:
        h = self._residual(h, "attn", lambda x: self.attn(x, x, self_mask, rope))
        if self.cross is not None:
            h = self._residual(h, "cross", lambda x: self.cross(x, enc, cross_mask))
        return self._residual(h, "mlp", self.mlp)

    def _residual(self, h, name: str, fn) -> jax.Array:
        if self.ngpt:
            alpha = jnp.abs(getattr(self, name).alpha[...])
            h_unit = unit_norm(h)
            return l2norm(h_unit + alpha * (l2norm(fn(h)) - h_unit))
        return h + fn(getattr(self, f"{name}_norm")(h))


class Stack(nnx.Module):
    """Embedding and layers of the encoder or the decoder (rmsnorm adds a final norm)."""

    def __init__(self, cfg: ModelConfig, specs, name: str, n_layers: int, rngs: nnx.Rngs,
                 cross: bool):
        self.embed = _param(specs, f"{name}.embed", rngs)
        self.layers = nnx.List([Block(cfg, specs, f"{name}.layers.{i}", rngs, cross)
                                for i in range(n_layers)])
        self.final_norm = None if cfg.norm == "ngpt" else Scale(specs, f"{name}.final_norm", rngs)

    def __call__(self, tokens_BxL, self_mask, rope, enc=None, cross_mask=None) -> jax.Array:
        h = jnp.take(self.embed[...], tokens_BxL, axis=0)  # ngpt: unit rows, fed as they are
        for layer in self.layers:
            h = layer(h, self_mask, rope, enc, cross_mask)
        return h if self.final_norm is None else self.final_norm(h)


class TnT(nnx.Module):
    """The whole model. `model(enc_tokens, dec_tokens)` returns float32 logits [B, Ld, V]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        specs = param_specs(cfg)
        self.encoder = (Stack(cfg, specs, "encoder", cfg.n_encoder_layers, rngs, cross=False)
                        if cfg.has_encoder else None)
        self.decoder = Stack(cfg, specs, "decoder", cfg.n_decoder_layers, rngs,
                             cross=cfg.has_encoder)
        self.lm_head = _param(specs, "lm_head", rngs)
        if cfg.norm == "ngpt":
            self.s_z = _param(specs, "s_z", rngs)

    def _check(self, tokens, max_len: int, what: str) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"{what} must have shape [batch, length], got {tokens.shape}")
        if tokens.shape[1] > max_len:
            raise ValueError(f"{what} has length {tokens.shape[1]}, longer than the model's "
                             f"maximum {max_len}")
        if not isinstance(tokens, jax.core.Tracer):  # under jit the caller validates the batch
            check_token_ids(np.asarray(tokens), self.cfg.vocab_size, what)

    def rope(self, length: int):
        """(cos, sin) for `apply_rope`, or (None, table) with `rope_mode="ngpt_reference"`."""
        cfg = self.cfg
        if cfg.rope_mode == "ngpt_reference":
            return None, jnp.asarray(reference_swap_table(length, cfg.head_dim, cfg.rope_base))
        return rope_tables(length, cfg.head_dim, cfg.rope_base)

    def encode(self, enc_tokens_BxS: jax.Array) -> jax.Array:
        """The encoder output [B, S, D] (ngpt: unit vectors; rmsnorm: after the final norm)."""
        self._check(enc_tokens_BxS, self.cfg.max_len_encoder, "enc_tokens")
        valid_BxS = enc_tokens_BxS != self.cfg.pad_id
        mask = jnp.broadcast_to(valid_BxS[:, None, :], (*enc_tokens_BxS.shape,
                                                        enc_tokens_BxS.shape[1]))
        return self.encoder(enc_tokens_BxS, mask, self.rope(enc_tokens_BxS.shape[1]))

    def decode(self, dec_tokens_BxL, enc_BxSxD=None, enc_tokens_BxS=None) -> jax.Array:
        self._check(dec_tokens_BxL, self.cfg.max_len_decoder, "dec_tokens")
        L = dec_tokens_BxL.shape[1]
        causal_LxL = jnp.tril(jnp.ones((L, L), bool))
        self_mask = causal_LxL[None] & (dec_tokens_BxL != self.cfg.pad_id)[:, None, :]
        cross_mask = None
        if enc_BxSxD is not None:
            cross_mask = jnp.broadcast_to((enc_tokens_BxS != self.cfg.pad_id)[:, None, :],
                                          (dec_tokens_BxL.shape[0], L, enc_tokens_BxS.shape[1]))
        h = self.decoder(dec_tokens_BxL, self_mask, self.rope(L), enc_BxSxD, cross_mask)
        logits = h @ self.lm_head[...]
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 stays
        if self.cfg.norm == "ngpt":
            logits = logits * self.s_z[...]
        return logits

    def __call__(self, enc_tokens_BxS, dec_tokens_BxL) -> jax.Array:
        if self.cfg.has_encoder:
            if enc_tokens_BxS is None:
                raise ValueError("encoder_decoder model needs enc_tokens")
            return self.decode(dec_tokens_BxL, self.encode(enc_tokens_BxS), enc_tokens_BxS)
        return self.decode(dec_tokens_BxL)


def loss_fn(model: TnT, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Mean float32 cross-entropy over non-pad labels; returns (loss, number of label tokens)."""
    logits = model(batch.get("enc_tokens"), batch["dec_tokens"])
    labels = batch["labels"]
    valid = labels != model.cfg.pad_id
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1), count


def _path(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def split_params(model: TnT) -> tuple[nnx.GraphDef, dict[str, jax.Array]]:
    """The model's graph and its parameters as the canonical flat dict (jax arrays)."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state)}


def merge_params(graphdef: nnx.GraphDef, params: dict[str, jax.Array]) -> TnT:
    """Rebuild a model from `split_params`' output (cheap, and traceable under jit)."""
    state = nnx.from_flat_state([(_path(n), nnx.Param(v)) for n, v in params.items()])
    return nnx.merge(graphdef, state)


def to_canonical(model: TnT) -> dict[str, np.ndarray]:
    """The canonical flat dict of docs/design.md: float32 numpy arrays, `[in, out]` layout."""
    return {n: np.asarray(v, dtype=np.float32) for n, v in split_params(model)[1].items()}


def load_canonical(model: TnT, params: dict[str, np.ndarray]) -> TnT:
    """Copy a canonical dict into `model` in place, after checking every name and shape."""
    check_canonical(params, model.cfg)
    state = nnx.from_flat_state([(_path(n), nnx.Param(jnp.asarray(v, jnp.float32)))
                                 for n, v in params.items()])
    nnx.update(model, state)
    return model
