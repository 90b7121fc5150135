"""The TnT model in PyTorch: encoder-decoder or decoder-only, nGPT or pre-norm RMSNorm.

The mirror of `tnt_jax/model.py`, and like it reads top to bottom as docs/design.md, "Forward pass".
Every parameter is a plain `nn.Parameter` created from the shared table
`tnt.params.param_specs` and stored in the canonical `[in, out]` layout (`y = x @ W`), so the
module paths *are* the canonical names (`decoder.layers.0.attn.wq`) and export/import is a copy
with no transposes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tnt.config import ModelConfig
from tnt.data import check_token_ids
from tnt.params import ParamSpec, check_canonical, param_specs
from tnt.rope import position_tables
from tnt_torch.distributed import full, like, local


class _L2Norm(torch.autograd.Function):
    """`y = x * r`, `r = 1 / max(||x||, 1e-12)`, with the backward written out:
    `dx = r * (g - y <g, y>)` (three ops instead of autograd's seven for norm, clamp and divide;
    l2norm is the most frequent op of an nGPT block, forward and backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        y, r = _l2norm_value(x, dim)
        ctx.save_for_backward(y, r)
        ctx.dim = dim
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        y, r = ctx.saved_tensors
        dot = (g * y).sum(ctx.dim, keepdim=True)
        return g.addcmul(y, dot, value=-1).mul_(r), None


def _l2norm_value(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min_(1e-12).reciprocal_()
    return x * r, r


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`x / max(||x||, 1e-12)` along `dim`, F.normalize's definition (tnt_jax.model.l2norm is the
    same); equal to it up to float rounding, and several times faster forward and backward.
    Computed and returned in float32 whatever the compute dtype (docs/design.md, "Compute
    dtype"). Without autograd (decoding) the same arithmetic runs without the Function's
    bookkeeping."""
    x = _at_least_float32(x)
    if not torch.is_grad_enabled():
        return _l2norm_value(x, dim)[0]
    return _L2Norm.apply(x, dim)


def project(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x @ w` in the compute dtype (both operands cast here, as tnt_jax.model.project does; the
    float32 parameter keeps its gradient in float32). A float32 compute dtype casts nothing, so a
    float64 model (the tests' exact checks) stays float64."""
    if dtype == torch.float32:
        return x @ w
    return x.to(dtype) @ w.to(dtype)


class _UnitNorm(torch.autograd.Function):
    """docs/design.md's `norm(h)` of a vector already on the unit sphere (the residual stream:
    embedding rows after the projection, every block's output): the value is `h` as is, the
    gradient is `l2norm`'s, `g - h <h, g>` (its `/ ||h||` is 1 there). Computing `h / ||h||`
    would change the value only by float round-off; the graph is what matters: without this op
    the radial part of the gradient would reach `h`, and the gradients would not be the
    reference's. The caller guarantees the unit norm (a non-unit `h` passes through unscaled)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return h.view_as(h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        return g.addcmul(h, (g * h).sum(-1, keepdim=True), value=-1)


def unit_norm(h: torch.Tensor) -> torch.Tensor:
    """`norm(h)` over the last axis for a unit-norm `h` (see `_UnitNorm`; tnt_jax.model.unit_norm
    is the same). Without autograd it is `h` itself."""
    return _UnitNorm.apply(h) if torch.is_grad_enabled() else h


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm computed in float32 (docs/design.md, rmsnorm baseline)."""
    return F.rms_norm(_at_least_float32(x), (x.shape[-1],), scale, eps).to(x.dtype)


class RoPE:
    """The position transform of q and k (docs/design.md, "RoPE"): `apply(x, positions)`.

    Hides which transform its tables serve: the rotation of pairs (x[i], x[i + dh/2]) by angle
    `pos * base^(-2i/dh)` (`_Rotate`), or, with `rope_mode="ngpt_reference"` (imported
    checkpoints only), the public nGPT code's `swap_pairs(x) * T`, which is not a rotation
    (NVIDIA/ngpt#10). Both mirrors build each length's tables once
    (`tnt.rope.position_tables`) and keep the forward from copying them to the device: here
    `TnT.rope` keeps one `RoPE` per (length, device), since a copy to a GPU at each call would
    wait for it.
    """

    def __init__(self, cfg: ModelConfig, length: int, device: torch.device | str = "cpu"):
        self.reference = cfg.rope_mode == "ngpt_reference"
        tables = position_tables(cfg.rope_mode, length, cfg.head_dim, cfg.rope_base)
        self.tables = tuple(torch.tensor(t, device=device) for t in tables)

    def apply(self, x_BxLxK: torch.Tensor, positions_BxL: torch.Tensor | None = None
              ) -> torch.Tensor:
        """`x` [B, L, ..., dh] transformed at `positions` (each row its own, e.g. while
        decoding), or at 0..L-1 when None."""
        middle = (1,) * (x_BxLxK.ndim - 3)
        if positions_BxL is None:
            L = x_BxLxK.shape[1]
            tables = [t[:L].view(L, *middle, -1) for t in self.tables]
        else:
            tables = [t[positions_BxL].view(*positions_BxL.shape, *middle, -1) for t in self.tables]
        if self.reference:
            return x_BxLxK.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * tables[0]
        if torch.compiler.is_compiling():  # the plain formula, which inductor fuses
            (x1, x2), (cos, sin) = x_BxLxK.chunk(2, dim=-1), tables
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        if not torch.is_grad_enabled():
            return _rotate(x_BxLxK, *tables, 1.0)
        return _Rotate.apply(x_BxLxK, *tables)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """`[x1 cos - sign x2 sin, x2 cos + sign x1 sin]` for the halves x1, x2 of the last axis,
    written into one new tensor: the rotation by +angle (sign 1) or -angle (sign -1)."""
    x1, x2 = x.chunk(2, dim=-1)
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
    y1, y2 = y.chunk(2, dim=-1)
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin, value=sign)
    return y


class _Rotate(torch.autograd.Function):
    """RoPE's rotation with the backward written out: the gradient of a rotation is the rotation
    by the opposite angle. Each direction is four half-width ops writing one tensor, where
    `x * [cos, cos] + swap_halves(x) * [-sin, sin]` through autograd copies x into a swapped
    tensor forward and concatenates the halves' gradients backward (q and k are rotated in every
    attention layer, so the copies are a visible share of the step on the CPU). Eager only: under
    torch.compile `RoPE.apply` gives inductor the plain formula to fuse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, -1.0), None, None


class KVCache:
    """One attention layer's keys and values [B, H, S, dh], preallocated, stored as attention
    uses them (keys transformed at their own position and, for ngpt, normalized and scaled by
    s_qk). Attention reads the first `length` columns (the columns written in any row).

    Self-attention writes each new token's key and value at its position, in place;
    cross-attention's cache holds the encoder output's, computed once per request.
    """

    def __init__(self, k_BxHxSxK: torch.Tensor, v_BxHxSxK: torch.Tensor, length: int = 0):
        self.k, self.v, self.length = k_BxHxSxK, v_BxHxSxK, length

    def write(self, k_BxTxHxK, v_BxTxHxK, positions_BxT) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys and values at their positions; returns the readable columns."""
        rows_Bx1 = torch.arange(k_BxTxHxK.shape[0], device=k_BxTxHxK.device)[:, None]
        self.k[rows_Bx1, :, positions_BxT] = k_BxTxHxK.to(self.k.dtype)
        self.v[rows_Bx1, :, positions_BxT] = v_BxTxHxK.to(self.v.dtype)
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class DecodeCache:
    """What decoding keeps between calls of `TnT.extend`: per decoder layer the self-attention
    cache and (encoder_decoder) the cross-attention cache, and which encoder tokens are real
    (None: all of them) (the fields of `tnt_jax.model.DecodeCache`)."""

    def __init__(self, layers: list[tuple[KVCache, KVCache | None]], enc_valid_BxS: torch.Tensor | None):
        self.layers, self.enc_valid_BxS = layers, enc_valid_BxS


def _derived(module: nn.Module, name: str, fn) -> torch.Tensor:
    """`fn()`, a fused or scaled weight. Inside `TnT.decoding()` it is computed once and reused
    (decoding calls each layer once per token with the same weights); the memo goes with the
    request, so no copy outlives it and no later change of the weights can be missed."""
    memo = module.__dict__.get("_decoding_memo")
    if memo is None:
        return fn()
    if name not in memo:
        memo[name] = fn()
    return memo[name]


class Mask:
    """Which keys each query may see. `None` fields mean "all": the no-padding causal case runs
    SDPA's `is_causal` fast path; otherwise a boolean `[B, 1, L, S]` mask, and rows with no
    visible key are zeroed explicitly (docs/design.md: exactly 0, never NaN) whenever a mask
    exists: asking whether any row is empty would read the device back."""

    def __init__(self, causal: bool, keep_Bx1xLxS: torch.Tensor | None) -> None:
        self.causal = causal
        self.keep = keep_Bx1xLxS
        self.empty_rows = None if keep_Bx1xLxS is None else ~keep_Bx1xLxS.any(-1, keepdim=True)


def attend(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, mask: Mask, scale: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention` in v's dtype (the compute dtype; q and k, normalized in
    float32, are cast to it here): flash / memory-efficient kernels where they apply, softmax
    statistics in float32 inside the kernel, no `[B, H, L, S]` scores kept for the backward."""
    q_BxHxLxK, k_BxHxSxK = q_BxHxLxK.to(v_BxHxSxK.dtype), k_BxHxSxK.to(v_BxHxSxK.dtype)
    if mask.keep is None:
        y = F.scaled_dot_product_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK,
                                           is_causal=mask.causal, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK,
                                           attn_mask=mask.keep, scale=scale)
    if mask.empty_rows is not None:
        y = y.masked_fill(mask.empty_rows, 0.0)
    return y


def _param(spec: ParamSpec, generator: torch.Generator) -> nn.Parameter:
    """One parameter from the shared table (ngpt matrices start on the unit sphere)."""
    if spec.init_std is None:
        return nn.Parameter(torch.full(spec.shape, spec.init_value, dtype=torch.float32))
    value = torch.randn(spec.shape, generator=generator, dtype=torch.float32) * spec.init_std
    if spec.project_axis is not None:
        value = l2norm(value, spec.project_axis)
    return nn.Parameter(value)


def initial_values(cfg: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, initial value) of every parameter, one at a time in `param_specs` order: the
    generator and the order `TnT(cfg, seed)` draws them in, so the same numbers. A model built on
    the `meta` device fills its shards from these (`tnt_torch.distributed.build_sharded`)."""
    gen = torch.Generator().manual_seed(seed)
    for name, spec in param_specs(cfg).items():
        yield name, _param(spec, gen).detach()


class Attention(nn.Module):
    """Multi-head attention; with ngpt, q and k are unit-normalized per head and scaled by s_qk.

    Self-attention multiplies by `[wq | wk | wv]` in one matmul and rotates/normalizes q and k as
    one tensor; cross-attention does the same for `[wk | wv]` on the encoder output.
    """

    def __init__(self, cfg: ModelConfig, specs, prefix: str, gen: torch.Generator,
                 self_attention: bool):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.self_attention = self_attention
        self.ngpt, self.dtype = cfg.norm == "ngpt", getattr(torch, cfg.dtype)
        for w in ("wq", "wk", "wv", "wo"):
            setattr(self, w, _param(specs[f"{prefix}.{w}"], gen))
        if self.ngpt:
            self.alpha = _param(specs[f"{prefix}.alpha"], gen)
            self.s_qk = _param(specs[f"{prefix}.s_qk"], gen)
        self.scale = math.sqrt(self.head_dim) if self.ngpt else 1.0 / math.sqrt(self.head_dim)

    def _qk(self, t_BxLxNxHxK: torch.Tensor, rope: RoPE | None, positions_BxL) -> torch.Tensor:
        """RoPE (self-attention) and, for ngpt, `s_qk * norm_dh(.)` on stacked q and/or k."""
        if self.self_attention:
            t_BxLxNxHxK = rope.apply(t_BxLxNxHxK, positions_BxL)
        if self.ngpt:
            t_BxLxNxHxK = l2norm(t_BxLxNxHxK) * self.s_qk.view(self.n_heads, self.head_dim)
        return t_BxLxNxHxK

    def keys_values(self, kv_BxSxD: torch.Tensor) -> KVCache:
        """Cross-attention keys and values of `kv` as attention uses them, for a cache."""
        B, S, _ = kv_BxSxD.shape
        kv = project(kv_BxSxD, torch.cat([self.wk, self.wv], 1), self.dtype).view(B, S, 2, self.n_heads, -1)
        k, v = self._qk(kv[:, :, :1], None, None)[:, :, 0], kv[:, :, 1]
        return KVCache(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), S)

    def forward(self, x_BxLxD, kv_BxSxD, mask: Mask, rope: RoPE | None = None,
                positions_BxL=None, cache: KVCache | None = None):
        """Returns (output [B, L, D], cache). With a cache, the keys of `kv` (if given) are
        written at `positions` first (in place) and the queries attend to the cache.
        Self-attention (`kv` is `x`) projects q, k and v in one matmul."""
        B, L, D = x_BxLxD.shape
        H, K = self.n_heads, self.head_dim
        if self.self_attention:
            w_qkv = _derived(self, "w_qkv", lambda: torch.cat([self.wq, self.wk, self.wv], 1))
            # split and unbind (not indexing): their gradients are one concatenation, where
            # each index's gradient would be a zero-filled copy of the whole qkv
            qk, v = project(x_BxLxD, w_qkv, self.dtype).view(B, L, 3, H, K).split((2, 1), dim=2)
            (q, k), v = self._qk(qk, rope, positions_BxL).unbind(2), v.squeeze(2)
        else:
            q = self._qk(project(x_BxLxD, self.wq, self.dtype).view(B, L, 1, H, K), rope,
                         positions_BxL)[:, :, 0]
            if kv_BxSxD is not None:
                S = kv_BxSxD.shape[1]
                kv = project(kv_BxSxD, torch.cat([self.wk, self.wv], 1), self.dtype).view(B, S, 2, H, K)
                k, v = self._qk(kv[:, :, :1], rope, positions_BxL)[:, :, 0], kv[:, :, 1]
        if cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        elif kv_BxSxD is not None:
            k, v = cache.write(k, v, positions_BxL)
        else:
            k, v = cache.k, cache.v
        y = attend(q.transpose(1, 2), k, v, mask, self.scale)
        return project(y.transpose(1, 2).reshape(B, L, D), self.wo, self.dtype), cache


class MLP(nn.Module):
    """Gated MLP `(u * act(v)) @ w_out`, `[u, v] = x @ w_in` (ngpt scales uv by s_uv*sqrt(d))."""

    def __init__(self, cfg: ModelConfig, specs, prefix: str, gen: torch.Generator):
        super().__init__()
        self.ngpt = cfg.norm == "ngpt"
        self.sqrt_d = math.sqrt(cfg.d_model)
        self.activation, self.dtype = cfg.activation, getattr(torch, cfg.dtype)
        self.w_in = _param(specs[f"{prefix}.w_in"], gen)
        self.w_out = _param(specs[f"{prefix}.w_out"], gen)
        if self.ngpt:
            self.alpha = _param(specs[f"{prefix}.alpha"], gen)
            self.s_uv = _param(specs[f"{prefix}.s_uv"], gen)

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        # ngpt: (x @ w_in) * s_uv*sqrt(d) computed as x @ (w_in * s_uv*sqrt(d)), a [d, 2F]
        # product instead of a [B, L, 2F] one (equal up to rounding).
        w_in = (_derived(self, "w_in", lambda: self.w_in * (self.s_uv * self.sqrt_d))
                if self.ngpt else self.w_in)
        return project(gated(project(x_BxLxD, w_in, self.dtype), self.activation),
                       self.w_out, self.dtype)


def _activation(v: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(v, approximate="none") if activation == "gelu" else F.silu(v)


def gated(uv: torch.Tensor, activation: str) -> torch.Tensor:
    """`u * act(v)` for `[u, v] = uv` split in halves of the last axis (tnt_jax.model.gated is the
    same). Eager with gradients it runs `_Gated`; under torch.compile the plain formula, which
    inductor fuses with its gradient better than it does the Function (measured)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        u, v = uv.chunk(2, dim=-1)
        return u * _activation(v, activation)
    return _Gated.apply(uv, activation)


class _Gated(torch.autograd.Function):
    """`gated` with the backward written into one `[.., 2F]` gradient: `du = g act(v)` into its
    first half and `dv = g u act'(v)` into its second. Through autograd, `split`'s backward
    concatenates the two halves' gradients, a copy of the MLP's largest activation per layer."""

    @staticmethod
    def forward(ctx, uv: torch.Tensor, activation: str) -> torch.Tensor:
        u, v = uv.chunk(2, dim=-1)
        act = _activation(v, activation)
        ctx.save_for_backward(uv, act)
        ctx.activation = activation
        return u * act

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        uv, act = ctx.saved_tensors
        u, v = uv.chunk(2, dim=-1)
        d_uv = torch.empty_like(uv)
        du, dv = d_uv.chunk(2, dim=-1)
        torch.mul(g, act, out=du)
        torch.mul(g, u, out=dv)
        if ctx.activation == "gelu":
            torch.ops.aten.gelu_backward.grad_input(dv, v, approximate="none", grad_input=dv)
        else:
            torch.ops.aten.silu_backward.grad_input(dv, v, grad_input=dv)
        return d_uv, None


class Scale(nn.Module):
    """An RMSNorm's learned scale (the rmsnorm baseline only)."""

    def __init__(self, specs, prefix: str, gen: torch.Generator):
        super().__init__()
        self.scale = _param(specs[f"{prefix}.scale"], gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale)


class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP, each joined to the stream by the residual
    update of the norm: nGPT's `norm(norm(h) + |alpha| (norm(f) - norm(h)))`, or the
    pre-norm `h + f(rmsnorm(h))`.

    With ngpt the input `h` is unit-norm (an embedding row, or the previous update's output), so
    docs/design.md's inner `norm(h)` is `unit_norm(h)`: no arithmetic forward, the normalization's
    gradient backward. The sublayer reads `h` itself, as in the design and the nGPT reference.
    """

    def __init__(self, cfg: ModelConfig, specs, prefix: str, gen: torch.Generator, cross: bool):
        super().__init__()
        self.ngpt = cfg.norm == "ngpt"
        self.attn = Attention(cfg, specs, f"{prefix}.attn", gen, self_attention=True)
        self.cross = Attention(cfg, specs, f"{prefix}.cross", gen, self_attention=False) if cross else None
        self.mlp = MLP(cfg, specs, f"{prefix}.mlp", gen)
        if not self.ngpt:
            self.attn_norm = Scale(specs, f"{prefix}.attn_norm", gen)
            self.cross_norm = Scale(specs, f"{prefix}.cross_norm", gen) if cross else None
            self.mlp_norm = Scale(specs, f"{prefix}.mlp_norm", gen)

    def forward(self, h, self_mask: Mask, rope: RoPE, enc=None, cross_mask: Mask | None = None,
                positions=None, cache: tuple[KVCache, KVCache | None] | None = None):
        """Returns (h, cache); `cache` is (self-attention's, cross-attention's) or None."""
        self_cache, cross_cache = (None, None) if cache is None else cache
        h = self._residual(h, "attn", lambda x: self.attn.forward(x, x, self_mask, rope, positions,
                                                                  self_cache)[0])
        if self.cross is not None:
            h = self._residual(h, "cross", lambda x: self.cross.forward(x, enc, cross_mask,
                                                                        cache=cross_cache)[0])
        return self._residual(h, "mlp", self.mlp.forward), cache

    def _residual(self, h, name: str, fn) -> torch.Tensor:
        if self.ngpt:
            return l2norm(torch.lerp(unit_norm(h), l2norm(fn(h)), getattr(self, name).alpha.abs()))
        return h + fn(getattr(self, f"{name}_norm").forward(h))


class Stack(nn.Module):
    """Embedding and layers of the encoder or the decoder (rmsnorm adds a final norm)."""

    def __init__(self, cfg: ModelConfig, specs, name: str, n_layers: int, gen: torch.Generator,
                 cross: bool):
        super().__init__()
        self.embed = _param(specs[f"{name}.embed"], gen)
        self.layers = nn.ModuleList([Block(cfg, specs, f"{name}.layers.{i}", gen, cross)
                                     for i in range(n_layers)])
        self.final_norm = None if cfg.norm == "ngpt" else Scale(specs, f"{name}.final_norm", gen)
        self.compiled = False  # see TnT.compile_blocks
        self.hooked = False  # FSDP2 (tnt_torch.distributed.shard) gathers a block's shards in hooks
        self.remat = cfg.remat == "block"

    def forward(self, tokens_BxL, self_mask: Mask, rope: RoPE, enc=None, cross_mask=None,
                positions=None, cache=None):
        """Returns (h, cache): the last layer's output and the caches (one per layer, written in
        place) or None."""
        h = F.embedding(tokens_BxL, self.embed)  # ngpt: unit rows, fed as they are
        compiled = self.compiled and torch.is_grad_enabled()
        remat = self.remat and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            # hooks (FSDP2's gathers) and the compiled block run through `layer(...)` only
            call = layer if compiled or self.hooked else layer.forward
            args = (h, self_mask, rope, enc, cross_mask, positions, None if cache is None else cache[i])
            if remat:  # remat="block": the backward recomputes the block from its input
                h, _ = checkpoint(call, *args, use_reentrant=False)
            else:
                h, _ = call(*args)
        return (h if self.final_norm is None else self.final_norm(h)), cache


class TnT(nn.Module):
    """The whole model. `model(enc_tokens, dec_tokens)` returns float32 logits [B, Ld, V].

    Parameters are initialized from `param_specs(cfg)` with a torch.Generator seeded by `seed`
    (the same seed does not give JAX's numbers: compare frameworks through `load_canonical`).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        specs = param_specs(cfg)
        gen = torch.Generator().manual_seed(seed)
        self.encoder = (Stack(cfg, specs, "encoder", cfg.n_encoder_layers, gen, cross=False)
                        if cfg.has_encoder else None)
        self.decoder = Stack(cfg, specs, "decoder", cfg.n_decoder_layers, gen,
                             cross=cfg.has_encoder)
        self.lm_head = _param(specs["lm_head"], gen)
        if cfg.norm == "ngpt":
            self.s_z = _param(specs["s_z"], gen)
        self.dtype = getattr(torch, cfg.dtype)
        self._rope_cache: dict[tuple, RoPE] = {}

    def compile_blocks(self, enable: bool = True) -> TnT:
        """Run the blocks through `torch.compile` (inductor fuses the many elementwise ops of the
        normalized residual, RoPE and q/k norms) when gradients are on, i.e. in training; no-grad
        evaluation and decoding, whose shapes vary, stay eager. Parameter names are unchanged
        (`nn.Module.compile` works in place). `enable=False` returns to eager everywhere."""
        for stack in (self.encoder, self.decoder):
            if stack is None:
                continue
            for layer in stack.layers:
                if enable:
                    layer.compile(dynamic=False)
                else:
                    layer._compiled_call_impl = None
            stack.compiled = enable
        return self

    def _check(self, tokens: torch.Tensor, max_len: int, what: str, ids: bool,
               padded: bool | None = None) -> bool | None:
        """Shape, dtype and, with `ids`, the id range of a token batch; returns whether it holds a
        pad token: `padded` when the caller knows, else read back with the id range, else None
        (unknown). The read is a device sync: callers who validated the ids where the batch was
        built (the backend's `_put`, the decode loop's own choices) pass `check_ids=False` and
        what they know of padding as `padded` (`tnt.data.has_pad`)."""
        if tokens.ndim != 2:
            raise ValueError(f"{what} must have shape [batch, length], got {tuple(tokens.shape)}")
        if tokens.shape[1] > max_len:
            raise ValueError(f"{what} has length {tokens.shape[1]}, longer than the model's "
                             f"maximum {max_len}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"{what} must be integer token ids, got {tokens.dtype}")
        if not ids or tokens.numel() == 0:
            return padded
        lo, hi = torch.aminmax(tokens)
        has_pad = (tokens == self.cfg.pad_id).any().to(lo.dtype)
        lo, hi, has_pad = torch.stack([lo, hi, has_pad]).tolist()  # one read for the three
        if lo < 0 or hi >= self.cfg.vocab_size:
            check_token_ids(tokens.cpu().numpy(), self.cfg.vocab_size, what)
        return bool(has_pad) if padded is None else padded

    def rope(self, length: int, device: torch.device) -> RoPE:
        """The position transform for `length` positions, built once per length and device."""
        key = (length, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = RoPE(self.cfg, length, device)
        return self._rope_cache[key]

    def _valid(self, tokens_BxL: torch.Tensor, padded: bool | None, read: bool = False
               ) -> torch.Tensor | None:
        """Non-pad positions [B, L], or None when the tokens hold no pad (the fast path). Decided
        by what the caller knows: unknown padding is read back only with `read` (public calls
        that read for their id check anyway), else the mask is built, which gives the same
        values."""
        valid = tokens_BxL != self.cfg.pad_id
        if padded is None and read:
            padded = not bool(valid.all())
        return None if padded is False else valid

    def encode(self, enc_tokens_BxS: torch.Tensor, *, check_ids: bool = True,
               padded: bool | None = None) -> torch.Tensor:
        """The encoder output [B, S, D] (ngpt: unit vectors; rmsnorm: after the final norm)."""
        padded = self._check(enc_tokens_BxS, self.cfg.max_len_encoder, "enc_tokens", check_ids, padded)
        valid = self._valid(enc_tokens_BxS, padded)
        S = enc_tokens_BxS.shape[1]
        mask = Mask(False, None if valid is None else valid[:, None, None, :].expand(-1, 1, S, S))
        return self.encoder(enc_tokens_BxS, mask, self.rope(S, enc_tokens_BxS.device))[0]

    def decode(self, dec_tokens_BxL, enc_BxSxD=None, enc_tokens_BxS=None, *,
               check_ids: bool = True, padded: bool | None = None) -> torch.Tensor:
        dec_padded = self._check(dec_tokens_BxL, self.cfg.max_len_decoder, "dec_tokens", check_ids,
                                 padded)
        L, device = dec_tokens_BxL.shape[1], dec_tokens_BxL.device
        valid = self._valid(dec_tokens_BxL, dec_padded)
        if valid is None:
            self_mask = Mask(True, None)
        else:
            causal_LxL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            self_mask = Mask(True, causal_LxL & valid[:, None, None, :])
        cross_mask = None
        if enc_BxSxD is not None:
            if enc_tokens_BxS is None:
                raise ValueError("decode with an encoder output needs enc_tokens for its mask")
            enc_valid = self._valid(enc_tokens_BxS, padded, read=check_ids)
            cross_mask = Mask(False, None if enc_valid is None else
                              enc_valid[:, None, None, :].expand(-1, 1, L, -1))
        h, _ = self.decoder(dec_tokens_BxL, self_mask, self.rope(L, device), enc_BxSxD,
                            cross_mask)
        return self._logits(h)

    def _logits(self, h_BxLxD: torch.Tensor) -> torch.Tensor:
        if self.cfg.norm == "ngpt":  # s_z * (h @ lm_head), as h @ (lm_head * s_z): [d, V] not [B, L, V]
            head = _derived(self, "head", lambda: self.lm_head * self.s_z)
            return _at_least_float32(project(h_BxLxD, head, self.dtype))
        return _at_least_float32(project(h_BxLxD, self.lm_head, self.dtype))

    @contextlib.contextmanager
    def decoding(self):
        """Within it, each fused or scaled weight (`_derived`) is computed once and reused by
        every call: for one decoding request, whose weights do not change."""
        modules = list(self.modules())
        for m in modules:
            m.__dict__["_decoding_memo"] = {}
        try:
            yield self
        finally:
            for m in modules:
                m.__dict__.pop("_decoding_memo", None)

    def start_cache(self, batch: int, length: int, enc_tokens_BxS=None, enc_BxSxD=None, *,
                    padded: bool | None = None) -> DecodeCache:
        """Preallocated self-attention caches of `length` positions for `batch` rows; for
        encoder_decoder, the encoder runs here once (unless its output `enc_BxSxD` is given) and
        each layer's cross-attention keys and values are computed once. `padded`: whether
        `enc_tokens` hold a pad, if known (see `forward`)."""
        cfg, device = self.cfg, self.lm_head.device
        shape = (batch, cfg.n_heads, length, cfg.head_dim)
        enc_out, enc_valid = None, None
        if cfg.has_encoder:
            if enc_tokens_BxS is None:
                raise ValueError("encoder_decoder model needs enc_tokens")
            enc_valid = self._valid(enc_tokens_BxS, padded, read=True)  # once per request
            enc_out = (self.encode(enc_tokens_BxS, padded=enc_valid is not None)
                       if enc_BxSxD is None else enc_BxSxD)
        dtype = self.lm_head.dtype if self.dtype == torch.float32 else self.dtype  # project's
        layers = [(KVCache(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)),
                   None if enc_out is None else layer.cross.keys_values(enc_out))
                  for layer in self.decoder.layers]
        return DecodeCache(layers, enc_valid)

    def extend(self, tokens_BxT, positions_BxT, cache: DecodeCache, *, check_ids: bool = True
               ) -> tuple[torch.Tensor, DecodeCache]:
        """Decode with the cache: the logits [B, T, V] of `tokens` at `positions` (each row its
        own, consecutive: `start_B + 0..T-1`), which attend to the cached positions up to their
        own; their keys and values are written into the cache in place. A prefill is T prompt
        tokens at 0..T-1, a decode step one token per row. `check_ids=False` skips the token-id
        range check, for ids the model itself chose (the decode loop; the check syncs the
        device every token)."""
        self._check(tokens_BxT, self.cfg.max_len_decoder, "tokens", check_ids)
        B, T = tokens_BxT.shape
        n_cols = int(positions_BxT.max()) + 1  # columns written in any row after this call
        if positions_BxT.shape != (B, T) or n_cols > cache.layers[0][0].k.shape[2]:
            raise ValueError(f"positions must be [B, T] = {(B, T)} within the cache's "
                             f"{cache.layers[0][0].k.shape[2]} columns, got shape "
                             f"{tuple(positions_BxT.shape)}, largest {n_cols - 1}")
        for self_cache, _ in cache.layers:
            self_cache.length = max(self_cache.length, n_cols)
        if T == n_cols:  # a prefill: every row at 0..T-1
            self_mask = Mask(True, None)
        elif B == 1 and T == 1:  # one row sees every column written
            self_mask = Mask(False, None)
        else:
            cols = torch.arange(n_cols, device=tokens_BxT.device)
            self_mask = Mask(False, cols[None, None, None, :] <= positions_BxT[:, None, :, None])
        cross_mask = None
        if cache.layers[0][1] is not None:  # encoder_decoder
            valid = cache.enc_valid_BxS
            cross_mask = Mask(False, None if valid is None else valid[:, None, None, :])
        rope = self.rope(cache.layers[0][0].k.shape[2], tokens_BxT.device)
        h, _ = self.decoder.forward(tokens_BxT, self_mask, rope, None, cross_mask,
                                    positions_BxT, cache.layers)
        return self._logits(h), cache

    def forward(self, enc_tokens_BxS, dec_tokens_BxL, *, check_ids: bool = True,
                padded: bool | None = None) -> torch.Tensor:
        """Logits of `dec_tokens` (after the encoder's output of `enc_tokens`); `check_ids=False`
        for batches validated where they were built (see `_check`). `padded`: whether any token
        is pad, known where the batch was built (`tnt.data.has_pad`); False takes SDPA's unmasked
        fast path. Unknown (None), it is read with the id check, or the masks are built."""
        if self.cfg.has_encoder:
            if enc_tokens_BxS is None:
                raise ValueError("encoder_decoder model needs enc_tokens")
            enc_BxSxD = self.encode(enc_tokens_BxS, check_ids=check_ids, padded=padded)
            return self.decode(dec_tokens_BxL, enc_BxSxD, enc_tokens_BxS, check_ids=check_ids,
                               padded=padded)
        return self.decode(dec_tokens_BxL, check_ids=check_ids, padded=padded)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a `.double()` model (the float64 tests): never narrower."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def without_pad(logits_BxLxV: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The logits with the pad column at -inf: pad is never a target nor generated, so it is no
    outcome of the model's distribution (docs/design.md, "Special ids"); its column gets a zero
    gradient (tnt_jax.model.without_pad is the same)."""
    is_pad_V = torch.arange(logits_BxLxV.shape[-1], device=logits_BxLxV.device) == pad_id
    return logits_BxLxV.masked_fill(is_pad_V, -torch.inf)


def loss_fn(model: TnT, batch: dict[str, torch.Tensor], *, check_ids: bool = True,
            padded: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean float32 cross-entropy over non-pad labels, the softmax over the real tokens only;
    returns (loss, number of label tokens). `check_ids`, `padded`: see `TnT.forward`."""
    logits = model(batch.get("enc_tokens"), batch["dec_tokens"], check_ids=check_ids, padded=padded)
    labels = batch["labels"].long()
    pad = model.cfg.pad_id
    logits = without_pad(_at_least_float32(logits.reshape(-1, logits.shape[-1])), pad)
    nll_sum = F.cross_entropy(logits, labels.reshape(-1), ignore_index=pad, reduction="sum")
    count = (labels != pad).sum()
    return nll_sum / count.clamp_min(1), count


def to_canonical(model: TnT) -> dict[str, np.ndarray]:
    """The canonical flat dict of docs/design.md, in `param_specs` order: float32 numpy copies,
    `[in, out]` layout (FSDP2 shards gathered: a collective, every rank calls it)."""
    named = dict(model.named_parameters())
    return {n: full(named[n].detach()).to("cpu", torch.float32).numpy().copy()
            for n in param_specs(model.cfg)}


def load_canonical(model: TnT, params: dict[str, np.ndarray]) -> TnT:
    """Copy a canonical dict into `model` in place, after checking every name and shape (an FSDP2
    rank keeps its shard of each)."""
    check_canonical(params, model.cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = torch.as_tensor(np.array(params[name], dtype=np.float32, copy=True))
            local(p).copy_(local(like(value, p)))
    return model
