"""Analytic memory of a train step: the activations each layer keeps for the backward pass (per
token), parameters, gradients and optimizer state, for `remat` none or block, flash (fused)
attention or the einsum path, in the compute dtype (docs/design.md, "Compute dtype").

XLA:CPU's `memory_analysis()` sees neither what a fused attention kernel saves nor what remat
saves, so the GPU presets are sized from this count; where XLA:CPU computes the same quantity
(einsum attention, float32, no remat) the two are compared in tests/test_memory.py.
"""

from __future__ import annotations

import dataclasses

from tnt.config import ModelConfig, RunConfig

BYTES = {"float32": 4, "bfloat16": 2}

# What one block keeps per token for its backward pass, as (tensor, width) with width a multiple
# of d (D), the MLP's hidden width (F).
# ngpt's residual `norm(h + alpha (norm(f) - h))` keeps f, norm(f) and the un-normalized sum for
# the two l2norm gradients; the stream between blocks is float32 (the norms compute in float32).
ATTENTION_KEPT = (("block input (read by wq, wk, wv)", "D"), ("q, k before the per-head norm", "2D"),
                  ("q, k scaled (read by the scores)", "2D"), ("v", "D"),
                  ("attention output (read by wo)", "D"), ("wo output f, norm(f), sum", "3D"))
# tnt_jax's gated activation recomputes act(v) in its backward; tnt_torch's `_Gated` also keeps it,
# F more per token (docs/scale.md gives what that adds to the GPU presets)
MLP_KEPT = (("block input (read by w_in)", "D"), ("u, v", "2F"), ("u * act(v) (read by w_out)", "F"),
            ("w_out output f, norm(f), sum", "3D"))
# the einsum path keeps the [H, S] scores per query: the masked float32 scores, their softmax and
# its compute-dtype copy read by the p @ v matmul (one float32 copy where the compute is float32)
EINSUM_SCORE_ROWS = 3
# queries per block of the einsum path's causal self-attention (tnt_jax.attention): a block keeps
# scores only for the keys up to its last query
CAUSAL_BLOCK = 64
# a fused kernel keeps its output and one float32 log-sum-exp per head, and nothing [H, S]-wide


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes of one train step on one device (no sharding): everything is counted once."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    accumulator_bytes: int  # the float32 gradient sum, only when the batch is split
    activation_bytes: int  # kept for the backward pass, for one microbatch
    working_bytes: int  # one block's recomputed activations under remat, plus the logits

    @property
    def total_bytes(self) -> int:
        return (self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes
                + self.accumulator_bytes + self.activation_bytes + self.working_bytes)


def _width(unit: str, cfg: ModelConfig) -> int:
    return int(unit[:-1] or 1) * {"D": cfg.d_model, "F": cfg.hidden}[unit[-1]]


def causal_keys(length: int) -> float:
    """The keys per query, on average, that the einsum path's causal self-attention over
    `length` tokens keeps scores for: each block of `CAUSAL_BLOCK` queries reads the keys up to its
    last query."""
    ends = [min(start + CAUSAL_BLOCK, length) for start in range(0, length, CAUSAL_BLOCK)]
    return sum((end - start) * end for start, end in zip(range(0, length, CAUSAL_BLOCK), ends,
                                                         strict=True)) / length


def kept_per_token(cfg: ModelConfig, keys: int, flash: bool, cross_keys: int = 0,
                   causal: bool = False) -> float:
    """Bytes one block keeps per query token for its backward pass, without remat: `keys` is the
    self-attention's key count (S), `causal` whether it is causal (the decoder), `flash` a fused
    kernel (no [H, S] scores), `cross_keys` the key count of a cross-attention (the decoder of
    encoder_decoder; 0: none)."""
    act = BYTES[cfg.dtype]
    stream = 4 if cfg.norm == "ngpt" else act  # the float32 stream of the norms

    def attention(n_keys: float) -> float:
        kept = sum(_width(u, cfg) for _, u in ATTENTION_KEPT) * act
        kept += cfg.n_heads * 4 if flash else EINSUM_SCORE_ROWS * cfg.n_heads * n_keys * 4
        return kept + cfg.d_model * (stream - act)  # its input is the float32 stream

    mlp = sum(_width(u, cfg) for _, u in MLP_KEPT) * act + cfg.d_model * (stream - act)
    self_attention = attention(causal_keys(keys) if causal and not flash else keys)
    return self_attention + (attention(cross_keys) if cross_keys else 0) + mlp


def activation_bytes(cfg: RunConfig, rows: int, flash: bool) -> tuple[int, int]:
    """(kept, working) activation bytes of a microbatch of `rows` sequences: `kept` lives through
    the backward pass, `working` is the largest transient (one recomputed block under remat and
    the float32 logits with their log-softmax)."""
    m, t = cfg.model, cfg.train
    stream = 4 if m.norm == "ngpt" else BYTES[m.dtype]
    # (layers, tokens, their keys, cross-attention keys, causal)
    stacks = [(m.n_decoder_layers, t.seq_len, t.seq_len, t.encoder_len if m.has_encoder else 0, True)]
    if m.has_encoder:
        stacks.append((m.n_encoder_layers, t.encoder_len, t.encoder_len, 0, False))
    kept = working = 0
    for layers, tokens, keys, cross_keys, causal in stacks:
        block = round(kept_per_token(m, keys, flash, cross_keys, causal) * tokens)
        if m.remat == "block":
            kept += layers * stream * m.d_model * tokens  # each block's input only
            working = max(working, block)
        else:
            kept += layers * block
    logits = 2 * 4 * m.vocab_size * t.seq_len
    return kept * rows, working * rows + logits * rows


def step_memory(cfg: RunConfig, parameter_count: int, flash: bool) -> Memory:
    """The analytic memory of `cfg`'s train step with float32 parameters and Adam's two moments."""
    rows = cfg.train.batch_size // cfg.train.grad_accum
    kept, working = activation_bytes(cfg, rows, flash)
    p = 4 * parameter_count
    return Memory(parameter_bytes=p, gradient_bytes=p, optimizer_state_bytes=2 * p,
                  accumulator_bytes=p if cfg.train.grad_accum > 1 else 0,
                  activation_bytes=kept, working_bytes=working)


def choose_microbatch(cfg: RunConfig, parameter_count: int, device_memory: float,
                      margin: float) -> tuple[str, int] | None:
    """(remat, grad_accum) for `cfg` with flash attention within `(1 - margin) * device_memory`:
    no remat where any microbatch fits (recomputing every block costs a third more compute),
    else block; the largest microbatch that divides batch_size. None when nothing fits."""
    batch = cfg.train.batch_size
    for remat in ("none", "block"):
        for rows in sorted((r for r in range(1, batch + 1) if batch % r == 0), reverse=True):
            trial = RunConfig(dataclasses.replace(cfg.model, remat=remat),
                              dataclasses.replace(cfg.train, grad_accum=batch // rows))
            if step_memory(trial, parameter_count, flash=True).total_bytes <= (1 - margin) * device_memory:
                return remat, batch // rows
    return None
