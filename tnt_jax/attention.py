"""Softmax attention for `tnt_jax.model`: the mask in the forms the fused kernels know, the kernel
per platform, and the rules under which cuDNN's flash attention takes a call (docs/design.md,
"Attention kernels").

Causality and key padding stay separate fields of `Mask`, so `jax.nn.dot_product_attention`
receives `is_causal=True` and `key_value_seq_lengths` (cuDNN then skips the masked blocks)
instead of a dense `[B, 1, L, S]` mask it would turn into a bias and visit in full.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from tnt.memory import CAUSAL_BLOCK  # the memory model counts the same blocks

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")

log = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Key j is visible to query i of row b when `(not causal or j <= i)` and
    `key_valid_BxS[b, j]` and `keep_BxLxS[b, i, j]` (a `None` field allows all). `causal` is
    static and means L == S (self-attention over one sequence); `keep_BxLxS` is the dense rest,
    for masks nothing else expresses (several decoding positions per row)."""

    key_valid_BxS: jax.Array | None = None
    keep_BxLxS: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def dense(self, batch: int, q_len: int, kv_len: int, q_start: int = 0) -> jax.Array:
        """The mask of queries `q_start .. q_start + q_len - 1` over keys `0 .. kv_len - 1` as one
        boolean `[B, q_len, kv_len]` array (by default: all of it)."""
        m = jnp.ones((1, q_len, kv_len), bool)
        if self.causal:
            m = m & (jnp.arange(kv_len)[None, :] <= q_start + jnp.arange(q_len)[:, None])[None]
        if self.key_valid_BxS is not None:
            m = m & self.key_valid_BxS[:, None, :kv_len]
        if self.keep_BxLxS is not None:
            m = m & self.keep_BxLxS[:, q_start:q_start + q_len, :kv_len]
        return jnp.broadcast_to(m, (batch, q_len, kv_len))


def cudnn_refusal(dtype, head_dim: int, q_len: int, kv_len: int, dense_mask: bool,
                  compute_capability: float | None) -> str | None:
    """Why cuDNN flash attention (through `jax.nn.dot_product_attention`) cannot take a call, or
    None when it can: the conditions jax checks when it builds the cuDNN call, so a refused call
    falls back to XLA at trace time instead of failing mid-run. `compute_capability` is the GPU's
    (None: no GPU visible, e.g. when exporting for CUDA from a CPU host)."""
    if compute_capability is None:
        return "no GPU is visible while tracing, so the cuDNN call cannot be built"
    if compute_capability < 8.0:
        return f"cuDNN flash attention needs compute capability >= 8.0, the GPU has {compute_capability}"
    if jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return f"cuDNN flash attention takes bfloat16 or float16, not {jnp.dtype(dtype).name}"
    max_head_dim = 256 if compute_capability >= 9.0 else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head dim {head_dim} is not a multiple of 8 up to {max_head_dim}"
    if dense_mask and (q_len % 2 or kv_len % 2):
        return f"a dense mask (a bias to cuDNN) needs even lengths in training, got L={q_len}, S={kv_len}"
    return None


def attend(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask: Mask | jax.Array, scale: float,
           implementation: str = "auto") -> jax.Array:
    """Softmax attention in v's dtype (the compute dtype) with float32 softmax statistics; a query
    row whose keys are all masked outputs exactly 0 (docs/design.md, "Masks"). `mask` is a `Mask`
    or a boolean `[B, L, S]` array.

    `implementation`: "einsum" (scores materialized, fastest on the CPU), "xla" or "cudnn"
    (`jax.nn.dot_product_attention`; cuDNN's flash attention never holds the `[B, H, L, S]`
    scores), or "auto": einsum on the CPU; on CUDA, cuDNN where `cudnn_refusal` allows it, else
    XLA with the reason logged. (On a CPU-only host "auto" traces einsum alone: to export a step
    for CUDA from there, pass "xla".)
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(mask, Mask):
        mask = Mask(keep_BxLxS=mask)
    if mask.causal and q_BxLxHxK.shape[1] != k_BxSxHxK.shape[1]:
        raise ValueError(f"a causal mask needs as many queries as keys, got L={q_BxLxHxK.shape[1]}, "
                         f"S={k_BxSxHxK.shape[1]}")
    dtype = v_BxSxHxK.dtype
    q, k = (q_BxLxHxK * scale).astype(dtype), k_BxSxHxK.astype(dtype)
    if implementation == "einsum":
        return _attend_einsum(q, k, v_BxSxHxK, mask)
    if implementation == "auto":
        return _attend_auto(q, k, v_BxSxHxK, mask)
    return _attend_fused(q, k, v_BxSxHxK, mask, implementation, implementation)


def _attend_auto(q, k, v, mask: Mask) -> jax.Array:
    """The einsum path where only the CPU exists (tracing nothing else keeps CPU compiles as
    cheap as they were); with a GPU present, the kernel is chosen per platform at lowering
    (`lax.platform_dependent`): einsum on the CPU, cuDNN or XLA on CUDA, XLA elsewhere."""
    if jax.default_backend() == "cpu":
        return _attend_einsum(q, k, v, mask)
    cuda = functools.partial(_attend_fused, implementation=_cuda_kernel(q, k, dense=False),
                             dense_implementation=_cuda_kernel(q, k, dense=True))
    xla = functools.partial(_attend_fused, implementation="xla", dense_implementation="xla")
    return jax.lax.platform_dependent(q, k, v, mask, cpu=_attend_einsum, cuda=cuda, default=xla)


def _cuda_kernel(q, k, dense: bool) -> str:
    """The CUDA kernel for these shapes: "cudnn" when `cudnn_refusal` allows it, else "xla"
    (the reason logged once)."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    capability = float(getattr(gpus[0], "compute_capability", 0.0)) if gpus else None
    reason = cudnn_refusal(q.dtype, q.shape[-1], q.shape[1], k.shape[1], dense, capability)
    if reason is None:
        return "cudnn"
    _log_fallback(reason)
    return "xla"


@functools.cache
def _log_fallback(reason: str) -> None:
    log.warning("attention runs on XLA, not cuDNN: %s", reason)


def _attend_fused(q, k, v, mask: Mask, implementation: str, dense_implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` with causality as `is_causal` and key padding as
    `key_value_seq_lengths` when the padding is a suffix of every row (checked on the device;
    otherwise the dense mask, `dense_implementation`). Rows with no visible key are zeroed."""
    B, L, S = q.shape[0], q.shape[1], k.shape[1]

    def call(impl, **masks):
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=impl, **masks)

    def by_dense(_):
        keep = mask.dense(B, L, S)
        return _zero_rows(call(dense_implementation, mask=keep[:, None]), jnp.any(keep, axis=-1))

    if mask.keep_BxLxS is not None:
        return by_dense(None)
    if mask.key_valid_BxS is None:  # every row sees at least key 0
        return call(implementation, is_causal=mask.causal)
    valid = mask.key_valid_BxS
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    suffix = jnp.all(valid == (jnp.arange(S)[None, :] < lengths[:, None]))

    def by_lengths(_):  # causal or not, query i sees key 0 iff the row has a key
        y = call(implementation, is_causal=mask.causal, key_value_seq_lengths=lengths)
        return _zero_rows(y, jnp.broadcast_to((lengths > 0)[:, None], (B, L)))

    return jax.lax.cond(suffix, by_lengths, by_dense, None)


def _zero_rows(y_BxLxHxK: jax.Array, has_key_BxL: jax.Array) -> jax.Array:
    """Exactly 0 for query rows with no visible key (XLA would give the mean of V)."""
    return jnp.where(has_key_BxL[:, :, None, None], y_BxLxHxK, jnp.zeros((), y_BxLxHxK.dtype))


def _attend_einsum(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask: Mask) -> jax.Array:
    """Scores materialized, by blocks of `CAUSAL_BLOCK` queries when the mask is causal: a block
    attends only to the keys up to its last query (the rest are masked for all its rows), which
    skips close to half the work of the score and value products at L >> CAUSAL_BLOCK. The
    products take q, k and v in their `[B, L, H, K]` layout and return the output in it: XLA:CPU
    then folds the layout change into the products instead of copying q, k, v and the output to
    `[B, H, L, K]` and back (measured: the bench step 3% faster)."""
    L = q_BxLxHxK.shape[1]
    if not mask.causal:
        return _attend_block(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask, 0)
    blocks = [_attend_block(q_BxLxHxK[:, s:s + CAUSAL_BLOCK], k_BxSxHxK[:, :s + CAUSAL_BLOCK],
                            v_BxSxHxK[:, :s + CAUSAL_BLOCK], mask, s) for s in range(0, L, CAUSAL_BLOCK)]
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def _attend_block(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask: Mask, q_start: int) -> jax.Array:
    """Queries `q_start ..` over keys `0 .. S-1`. Cheaper on the [B, H, L, S] scores than the
    textbook order, same math: the scale has multiplied q (L*dh numbers, not L*S), and the
    softmax's division is applied to the output (`(exp(s - max) @ v) / sum exp(s - max)`, L*dh
    divisions, not L*S). Scores and softmax statistics are float32. Masked scores are set to the
    float minimum, so a fully masked row is a uniform softmax, zeroed explicitly."""
    B, L = q_BxLxHxK.shape[:2]
    keep_Bx1xLxS = mask.dense(B, L, k_BxSxHxK.shape[1], q_start)[:, None]
    stats = jnp.promote_types(v_BxSxHxK.dtype, jnp.float32)  # float64 models stay float64
    scores = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=stats)
    scores = jnp.where(keep_Bx1xLxS, scores, jnp.finfo(scores.dtype).min)
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total_BxLxHx1 = jnp.swapaxes(jnp.sum(weights, axis=-1), 1, 2)[..., None]
    y = jnp.einsum("bhls,bshk->blhk", weights.astype(v_BxSxHxK.dtype), v_BxSxHxK,
                   preferred_element_type=stats) / total_BxLxHx1
    if mask.key_valid_BxS is None and mask.keep_BxLxS is None:  # every query sees key 0
        return y.astype(v_BxSxHxK.dtype)
    return _zero_rows(y, jnp.any(keep_Bx1xLxS[:, 0], axis=-1)).astype(v_BxSxHxK.dtype)
