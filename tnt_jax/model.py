"""The TnT model in Flax NNX: encoder-decoder or decoder-only, nGPT or pre-norm RMSNorm.

Reads top to bottom like docs/design.md, "Forward pass". Every parameter is created from the shared
table `tnt.params.param_specs`, so names, shapes, init and the unit-norm rule are the ones the
torch port uses too. Module attribute paths *are* the canonical names
(`decoder.layers.0.attn.wq`), which makes export and import a flatten and a join.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnt.config import ModelConfig
from tnt.data import check_token_ids
from tnt.params import ParamSpec, check_canonical, param_specs
from tnt.rope import position_tables
from tnt_jax.attention import Mask, attend


def l2norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / max(||x||, 1e-12)` along `axis` (torch's F.normalize, so both sides agree), computed
    and returned in float32 whatever the compute dtype (docs/design.md, "Compute dtype")."""
    return _l2norm(_at_least_float32(x), axis)


def _at_least_float32(x: jax.Array) -> jax.Array:
    """float32, or float64 for a float64 model (the tests' exact checks): never narrower."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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
    x32 = _at_least_float32(x)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.reshape((1,) * (x.ndim - 1) + scale.shape)).astype(x.dtype)


def project(x_BxLxD: jax.Array, w_DxF: jax.Array, dtype) -> jax.Array:
    """`x @ w` in the compute dtype `dtype` (both operands cast here, at the module boundary; the
    float32 parameter keeps its gradient in float32). The tokens are flattened to `[B*L, D]`
    first: the same values, and XLA:CPU computes the weight gradient of a 2-D matmul ~2.4x faster
    than with the batch axes kept (docs/design.md, "Compute dtype")."""
    x_NxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    if dtype != jnp.float32:  # float32 casts nothing, so a float64 model stays float64
        x_NxD, w_DxF = x_NxD.astype(dtype), w_DxF.astype(dtype)
    y = x_NxD @ w_DxF
    return y.reshape(*x_BxLxD.shape[:-1], w_DxF.shape[-1])


@jax.tree_util.register_pytree_node_class
class RoPE:
    """The position transform of q and k (docs/design.md, "RoPE"): `apply(x, positions)`.

    Hides which transform its tables serve: the rotation of pairs (x[i], x[i + dh/2]) by angle
    `pos * base^(-2i/dh)` (the "rotate half" convention), or, with
    `rope_mode="ngpt_reference"` (imported checkpoints only), the public nGPT code's transform
    `swap_pairs(x) * T`, which is not a rotation (NVIDIA/ngpt#10). Both mirrors build each
    length's tables once (`tnt.rope.position_tables`) and keep the forward from copying them to
    the device: here a `RoPE` per call is free, since under `jit` its tables are constants of the
    compiled step.
    """

    def __init__(self, cfg: ModelConfig, length: int):
        self.reference = cfg.rope_mode == "ngpt_reference"
        tables = position_tables(cfg.rope_mode, length, cfg.head_dim, cfg.rope_base)
        self.tables = tuple(jnp.asarray(t) for t in tables)

    def tree_flatten(self):
        """A pytree (tables as leaves, the mode as static data), so that transforms such as
        `nnx.remat` can take it as an argument."""
        return self.tables, self.reference

    @classmethod
    def tree_unflatten(cls, reference: bool, tables) -> RoPE:
        rope = object.__new__(cls)
        rope.reference, rope.tables = reference, tuple(tables)
        return rope

    def apply(self, x_BxLxHxK: jax.Array, positions_BxL: jax.Array | None = None) -> jax.Array:
        """`x` transformed at `positions` (each row its own, e.g. while decoding), or at
        0..L-1 when None."""
        if positions_BxL is None:
            L = x_BxLxHxK.shape[1]
            tables = [t[None, :L, None, :] for t in self.tables]
        else:
            tables = [t[positions_BxL][:, :, None, :] for t in self.tables]
        if self.reference:
            pairs = x_BxLxHxK.reshape(*x_BxLxHxK.shape[:-1], -1, 2)[..., ::-1]
            return pairs.reshape(x_BxLxHxK.shape) * tables[0]
        cos, sin = tables
        x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class KVCache(NamedTuple):
    """One attention layer's keys and values [B, S, H, dh], stored as attention uses them (keys
    transformed at their own position and, for ngpt, normalized and scaled by s_qk).

    Self-attention writes each new token's key and value at its position; cross-attention's
    cache holds the encoder output's, computed once per request.
    """

    k: jax.Array
    v: jax.Array

    def write(self, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, positions_BxT: jax.Array):
        rows_Bx1 = jnp.arange(k_BxTxHxK.shape[0])[:, None]
        return KVCache(self.k.at[rows_Bx1, positions_BxT].set(k_BxTxHxK.astype(self.k.dtype)),
                       self.v.at[rows_Bx1, positions_BxT].set(v_BxTxHxK.astype(self.v.dtype)))


class DecodeCache(NamedTuple):
    """What decoding keeps between calls of `TnT.extend`: per decoder layer the self-attention
    cache and (encoder_decoder) the cross-attention cache, and which encoder tokens are real."""

    layers: tuple[tuple[KVCache, KVCache | None], ...]
    enc_valid_BxS: jax.Array | None


def _activation_and_slope(v: jax.Array, activation: str) -> tuple[jax.Array, jax.Array]:
    """`act(v)` and `act'(v)`: exact GELU `v Phi(v)` (slope `Phi(v) + v phi(v)`), torch's formula
    with `Phi` through erf (`jax.nn.gelu(approximate=False)` goes through erfc, markedly slower on
    the CPU), or SiLU `v sigma(v)` (slope `sigma(v) (1 + v (1 - sigma(v)))`)."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + jax.lax.erf(v * (1.0 / math.sqrt(2.0))))
        return v * cdf, cdf + v * (jnp.exp(-0.5 * v * v) * (1.0 / math.sqrt(2.0 * math.pi)))
    sig = jax.nn.sigmoid(v)
    return v * sig, sig * (1.0 + v * (1.0 - sig))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def gated(uv: jax.Array, activation: str) -> jax.Array:
    """`u * act(v)` for `[u, v]` the two halves of `uv`'s last axis. The gradient is written as
    one array, `[g act(v), g u act'(v)]`, in one pass over `uv`: autodiff makes four passes over
    these `[tokens, 2F]` arrays (the activation's slope, two products, the concatenation), and
    the CPU step is bound by that memory traffic."""
    u, v = jnp.split(uv, 2, axis=-1)
    return u * _activation_and_slope(v, activation)[0]


def _gated_bwd(activation: str, uv: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # The barrier keeps XLA from sharing the forward's erf with this recomputation: shared, it
    # is written out as a [tokens, F] array the forward splits into three passes to produce and
    # the step keeps until the backward; recomputed, the forward is one pass (the bench step
    # measured 2-3 ms faster, docs/results.md).
    uv = jax.lax.optimization_barrier(uv)
    u, v = jnp.split(uv, 2, axis=-1)
    act, slope = _activation_and_slope(v, activation)
    return (jnp.concatenate([g * act, g * u * slope], axis=-1),)


gated.defvjp(lambda uv, activation: (gated(uv, activation), uv), _gated_bwd)


def _param(spec: ParamSpec, rngs: nnx.Rngs) -> nnx.Param:
    """Initialize one parameter from the shared table (ngpt matrices start on the unit sphere)."""
    if spec.init_std is None:
        return nnx.Param(jnp.full(spec.shape, spec.init_value, jnp.float32))
    value = spec.init_std * jax.random.normal(rngs.params(), spec.shape, jnp.float32)
    if spec.project_axis is not None:
        value = l2norm(value, spec.project_axis)
    return nnx.Param(value)


class Attention(nnx.Module):
    """Multi-head attention; with ngpt, q and k are unit-normalized per head and scaled by s_qk."""

    def __init__(self, cfg: ModelConfig, specs, prefix: str, rngs: nnx.Rngs,
                 self_attention: bool):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.self_attention = self_attention
        self.ngpt, self.dtype = cfg.norm == "ngpt", jnp.dtype(cfg.dtype)
        for w in ("wq", "wk", "wv", "wo"):
            setattr(self, w, _param(specs[f"{prefix}.{w}"], rngs))
        if self.ngpt:
            self.alpha = _param(specs[f"{prefix}.alpha"], rngs)
            self.s_qk = _param(specs[f"{prefix}.s_qk"], rngs)

    def _heads(self, t_BxLxD: jax.Array) -> jax.Array:
        return t_BxLxD.reshape(t_BxLxD.shape[0], t_BxLxD.shape[1], self.n_heads, self.head_dim)

    def _qk(self, t_BxLxHxK, rope: RoPE | None, positions_BxL) -> jax.Array:
        """RoPE (self-attention) and, for ngpt, `s_qk * norm_dh(t)` on q or k."""
        if self.self_attention:
            t_BxLxHxK = rope.apply(t_BxLxHxK, positions_BxL)
        if self.ngpt:
            s_qk_1x1xHxK = self.s_qk[...].reshape(1, 1, self.n_heads, self.head_dim)
            t_BxLxHxK = s_qk_1x1xHxK * l2norm(t_BxLxHxK)
        return t_BxLxHxK

    def keys_values(self, kv_BxSxD, rope: RoPE | None = None, positions_BxS=None) -> KVCache:
        """Keys and values of `kv` as attention uses them (what a cache stores)."""
        k = self._qk(self._heads(project(kv_BxSxD, self.wk[...], self.dtype)), rope, positions_BxS)
        return KVCache(k, self._heads(project(kv_BxSxD, self.wv[...], self.dtype)))

    def __call__(self, x_BxLxD, kv_BxSxD, mask: Mask, rope: RoPE | None = None,
                 positions_BxL=None, cache: KVCache | None = None):
        """Returns (output [B, L, D], cache). With a cache, the keys of `kv` (if given) are
        written at `positions` first and the queries attend to the whole cache."""
        B, L, D = x_BxLxD.shape
        q = self._qk(self._heads(project(x_BxLxD, self.wq[...], self.dtype)), rope, positions_BxL)
        if kv_BxSxD is not None:
            k, v = self.keys_values(kv_BxSxD, rope, positions_BxL)
            if cache is not None:
                cache = cache.write(k, v, positions_BxL)
        if cache is not None:
            k, v = cache
        scale = math.sqrt(self.head_dim) if self.ngpt else 1.0 / math.sqrt(self.head_dim)
        y = attend(q, k, v, mask, scale)
        return project(y.reshape(B, L, D), self.wo[...], self.dtype), cache


class MLP(nnx.Module):
    """Gated MLP `(u * act(v)) @ w_out` with `[u, v] = x @ w_in` (ngpt scales uv by s_uv*sqrt(d))."""

    def __init__(self, cfg: ModelConfig, specs, prefix: str, rngs: nnx.Rngs):
        self.ngpt, self.d_model = cfg.norm == "ngpt", cfg.d_model
        self.activation, self.dtype = cfg.activation, jnp.dtype(cfg.dtype)
        self.w_in = _param(specs[f"{prefix}.w_in"], rngs)
        self.w_out = _param(specs[f"{prefix}.w_out"], rngs)
        if self.ngpt:
            self.alpha = _param(specs[f"{prefix}.alpha"], rngs)
            self.s_uv = _param(specs[f"{prefix}.s_uv"], rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        w_in = self.w_in[...]
        if self.ngpt:  # (x @ w) * s == x @ (w * s) for a per-column s: scale d*2F, not B*L*2F
            w_in = w_in * (self.s_uv[...] * math.sqrt(self.d_model))[None, :]
        return project(gated(project(x_BxLxD, w_in, self.dtype), self.activation),
                       self.w_out[...], self.dtype)


class Scale(nnx.Module):
    """An RMSNorm's learned scale (the rmsnorm baseline only)."""

    def __init__(self, specs, prefix: str, rngs: nnx.Rngs):
        self.scale = _param(specs[f"{prefix}.scale"], rngs)

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
        self.attn = Attention(cfg, specs, f"{prefix}.attn", rngs, self_attention=True)
        self.cross = Attention(cfg, specs, f"{prefix}.cross", rngs, self_attention=False) if cross else None
        self.mlp = MLP(cfg, specs, f"{prefix}.mlp", rngs)
        if not self.ngpt:
            self.attn_norm = Scale(specs, f"{prefix}.attn_norm", rngs)
            self.cross_norm = Scale(specs, f"{prefix}.cross_norm", rngs) if cross else None
            self.mlp_norm = Scale(specs, f"{prefix}.mlp_norm", rngs)

    def __call__(self, h, self_mask, rope: RoPE, enc=None, cross_mask=None, positions=None,
                 cache: tuple[KVCache, KVCache | None] | None = None):
        """Returns (h, cache); `cache` is (self-attention's, cross-attention's) or None."""
        self_cache, cross_cache = (None, None) if cache is None else cache

        def attn(x):
            nonlocal self_cache
            y, self_cache = self.attn(x, x, self_mask, rope, positions, self_cache)
            return y

        h = self._residual(h, "attn", attn)
        if self.cross is not None:
            h = self._residual(h, "cross", lambda x: self.cross(x, enc, cross_mask,
                                                                 cache=cross_cache)[0])
        h = self._residual(h, "mlp", self.mlp)
        return h, (None if cache is None else (self_cache, cross_cache))

    def _residual(self, h, name: str, fn) -> jax.Array:
        if self.ngpt:
            alpha = jnp.abs(getattr(self, name).alpha[...]).reshape(1, 1, -1)
            h_unit = unit_norm(h)
            return l2norm(h_unit + alpha * (l2norm(fn(h)) - h_unit))
        return h + fn(getattr(self, f"{name}_norm")(h))


class Stack(nnx.Module):
    """Embedding and layers of the encoder or the decoder (rmsnorm adds a final norm)."""

    def __init__(self, cfg: ModelConfig, specs, name: str, n_layers: int, rngs: nnx.Rngs,
                 cross: bool):
        self.embed = _param(specs[f"{name}.embed"], rngs)
        self.layers = nnx.List([Block(cfg, specs, f"{name}.layers.{i}", rngs, cross)
                                for i in range(n_layers)])
        self.final_norm = None if cfg.norm == "ngpt" else Scale(specs, f"{name}.final_norm", rngs)
        self.remat = cfg.remat == "block"

    def __call__(self, tokens_BxL, self_mask, rope: RoPE, enc=None, cross_mask=None,
                 positions=None, cache=None):
        """Returns (h, cache): the last layer's output and, with a cache (one per layer), the
        caches with the new tokens written."""
        h = jnp.take(self.embed[...], tokens_BxL, axis=0)  # ngpt: unit rows, fed as they are
        call = nnx.remat(_call_block) if self.remat and cache is None else _call_block
        new_cache = []
        for i, layer in enumerate(self.layers):
            h, layer_cache = call(layer, h, self_mask, rope, enc, cross_mask, positions,
                                  None if cache is None else cache[i])
            new_cache.append(layer_cache)
        h = h if self.final_norm is None else self.final_norm(h)
        return h, (None if cache is None else tuple(new_cache))


def _call_block(block: Block, *args) -> jax.Array:
    """`block(*args)`, as a function of the block for `nnx.remat` (`remat="block"`: the backward
    pass recomputes each block's activations from its input instead of keeping them)."""
    return block(*args)


class TnT(nnx.Module):
    """The whole model. `model(enc_tokens, dec_tokens)` returns float32 logits [B, Ld, V]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        specs = param_specs(cfg)
        self.encoder = (Stack(cfg, specs, "encoder", cfg.n_encoder_layers, rngs, cross=False)
                        if cfg.has_encoder else None)
        self.decoder = Stack(cfg, specs, "decoder", cfg.n_decoder_layers, rngs,
                             cross=cfg.has_encoder)
        self.lm_head = _param(specs["lm_head"], rngs)
        if cfg.norm == "ngpt":
            self.s_z = _param(specs["s_z"], rngs)

    def _check(self, tokens, max_len: int, what: str) -> None:
        """Shape, dtype and id range of a token batch. The id range is checked on concrete
        arrays only: inside a user's own `jax.jit` the ids are tracers, the check is bypassed
        and JAX's gather clamps an out-of-range id silently, so validate a batch with
        `tnt.data.check_token_ids` before a jitted call (pretrain and generate do)."""
        dtype = getattr(tokens, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"{what} must be an integer array of token ids, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.ndim != 2:
            raise ValueError(f"{what} must have shape [batch, length], got {tokens.shape}")
        if tokens.shape[1] > max_len:
            raise ValueError(f"{what} has length {tokens.shape[1]}, longer than the model's "
                             f"maximum {max_len}")
        if not isinstance(tokens, jax.core.Tracer):  # under jit the caller validates the batch
            check_token_ids(np.asarray(tokens), self.cfg.vocab_size, what)

    def encode(self, enc_tokens_BxS: jax.Array) -> jax.Array:
        """The encoder output [B, S, D] (ngpt: unit vectors; rmsnorm: after the final norm)."""
        self._check(enc_tokens_BxS, self.cfg.max_len_encoder, "enc_tokens")
        mask = Mask(key_valid_BxS=enc_tokens_BxS != self.cfg.pad_id)
        return self.encoder(enc_tokens_BxS, mask, RoPE(self.cfg, enc_tokens_BxS.shape[1]))[0]

    def decode(self, dec_tokens_BxL, enc_BxSxD=None, enc_tokens_BxS=None) -> jax.Array:
        self._check(dec_tokens_BxL, self.cfg.max_len_decoder, "dec_tokens")
        L = dec_tokens_BxL.shape[1]
        self_mask = Mask(key_valid_BxS=dec_tokens_BxL != self.cfg.pad_id, causal=True)
        cross_mask = None
        if enc_BxSxD is not None:
            cross_mask = Mask(key_valid_BxS=enc_tokens_BxS != self.cfg.pad_id)
        h, _ = self.decoder(dec_tokens_BxL, self_mask, RoPE(self.cfg, L), enc_BxSxD, cross_mask)
        return self._logits(h)

    def _logits(self, h_BxLxD: jax.Array) -> jax.Array:
        logits = project(h_BxLxD, self.lm_head[...], jnp.dtype(self.cfg.dtype))
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 stays
        if self.cfg.norm == "ngpt":
            logits = logits * self.s_z[...].reshape(1, 1, -1)
        return logits

    def start_cache(self, batch: int, length: int, enc_tokens_BxS=None) -> DecodeCache:
        """Empty self-attention caches of `length` positions for `batch` rows; for
        encoder_decoder, the encoder runs here once and each layer's cross-attention keys and
        values are computed once."""
        cfg = self.cfg
        dtype = self.lm_head[...].dtype if cfg.dtype == "float32" else jnp.dtype(cfg.dtype)
        zeros = jnp.zeros((batch, length, cfg.n_heads, cfg.head_dim), dtype)  # project's dtype
        enc_out = enc_valid = None
        if cfg.has_encoder:
            if enc_tokens_BxS is None:
                raise ValueError("encoder_decoder model needs enc_tokens")
            enc_out, enc_valid = self.encode(enc_tokens_BxS), enc_tokens_BxS != cfg.pad_id
        layers = tuple((KVCache(zeros, zeros),
                        None if enc_out is None else layer.cross.keys_values(enc_out))
                       for layer in self.decoder.layers)
        return DecodeCache(layers, enc_valid)

    def extend(self, tokens_BxT, positions_BxT, cache: DecodeCache
               ) -> tuple[jax.Array, DecodeCache]:
        """Decode with the cache: the logits [B, T, V] of `tokens` at `positions` (each row its
        own), which attend to the cached positions up to their own; their keys and values are
        written into the returned cache. A prefill is T prompt tokens at 0..T-1, a decode step
        one token per row: a pure function of the parameters, the cache and the tokens, so it
        runs inside `lax.while_loop`."""
        self._check(tokens_BxT, self.cfg.max_len_decoder, "tokens")
        S = cache.layers[0][0].k.shape[1]
        if positions_BxT.shape != tokens_BxT.shape or (
                not isinstance(positions_BxT, jax.core.Tracer) and int(positions_BxT.max()) >= S):
            raise ValueError(f"positions must be [B, T] = {tokens_BxT.shape} within the cache's "
                             f"{S} columns (JAX would clamp), got {positions_BxT.shape}")
        seen_BxTxS = jnp.arange(S)[None, None, :] <= positions_BxT[:, :, None]
        # one token per row sees a prefix of the cache: sequence lengths to the fused kernels
        self_mask = (Mask(key_valid_BxS=seen_BxTxS[:, 0]) if tokens_BxT.shape[1] == 1
                     else Mask(keep_BxLxS=seen_BxTxS))
        cross_mask = None
        if cache.enc_valid_BxS is not None:
            cross_mask = Mask(key_valid_BxS=cache.enc_valid_BxS)
        h, layers = self.decoder(tokens_BxT, self_mask, RoPE(self.cfg, S), None, cross_mask,
                                 positions_BxT, cache.layers)
        return self._logits(h), DecodeCache(layers, cache.enc_valid_BxS)

    def __call__(self, enc_tokens_BxS, dec_tokens_BxL) -> jax.Array:
        if self.cfg.has_encoder:
            if enc_tokens_BxS is None:
                raise ValueError("encoder_decoder model needs enc_tokens")
            return self.decode(dec_tokens_BxL, self.encode(enc_tokens_BxS), enc_tokens_BxS)
        return self.decode(dec_tokens_BxL)


def without_pad(logits_BxLxV: jax.Array, pad_id: int) -> jax.Array:
    """The logits with the pad column at -inf: pad is never a target nor generated, so it is no
    outcome of the model's distribution (docs/design.md, "Special ids"); its column gets a zero
    gradient."""
    is_pad_V = jnp.arange(logits_BxLxV.shape[-1]) == pad_id
    return jnp.where(is_pad_V, -jnp.inf, logits_BxLxV)


def loss_fn(model: TnT, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Mean float32 cross-entropy over non-pad labels, the softmax over the real tokens only;
    returns (loss, number of label tokens)."""
    logits = model(batch.get("enc_tokens"), batch["dec_tokens"])
    labels = batch["labels"]
    valid = labels != model.cfg.pad_id
    logp = jax.nn.log_softmax(without_pad(logits, model.cfg.pad_id), axis=-1)
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
