"""Training FLOPs per token of a TnT model, for throughput and MFU reports (`experiments.bench`).

The count is the usual one (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B):

- every matmul parameter costs 2 FLOPs per token it is applied to in the forward pass and 4 in
  the backward pass, so `6 * params * tokens`;
- attention's two products (`q k^T` and `probs v`) cost `2 * 2 * Lq * Lk * d` per layer forward,
  times 3 with the backward pass: `12 * d * Lq * Lk` per sequence and layer. As in PaLM and
  nanoGPT's `estimate_mfu`, the causal mask is not discounted (the kernels compute the full square).

Not counted: the embedding gather, norms, RoPE, softmax, activations, the nGPT scalers and the
optimizer; they are elementwise and cheap in FLOPs (not always in time: that is what MFU shows).
"""

from __future__ import annotations

import re

from tnt.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> dict[str, int]:
    """Matmul parameters per kind of layer: one attention, one MLP, the lm_head."""
    d, F, V = cfg.d_model, cfg.hidden, cfg.vocab_size
    return {"attention": 4 * d * d, "mlp": 3 * d * F, "lm_head": d * V}


def flops_per_sequence(cfg: ModelConfig, enc_len: int, dec_len: int) -> int:
    """Training FLOPs (forward + backward) for one example of `enc_len` + `dec_len` tokens."""
    d, p = cfg.d_model, matmul_params(cfg)
    attn_scores = lambda lq, lk: 12 * d * lq * lk  # noqa: E731
    total = 0
    if cfg.has_encoder:
        total += cfg.n_encoder_layers * (6 * (p["attention"] + p["mlp"]) * enc_len
                                         + attn_scores(enc_len, enc_len))
    per_dec_layer = 6 * (p["attention"] + p["mlp"]) * dec_len + attn_scores(dec_len, dec_len)
    if cfg.has_encoder:  # cross-attention: wq, wo on decoder tokens, wk, wv on encoder tokens
        half = 2 * d * d
        per_dec_layer += 6 * half * dec_len + 6 * half * enc_len + attn_scores(dec_len, enc_len)
    total += cfg.n_decoder_layers * per_dec_layer
    total += 6 * p["lm_head"] * dec_len
    return total


def flops_per_token(cfg: ModelConfig, enc_len: int, dec_len: int) -> float:
    """Training FLOPs per input token (encoder + decoder tokens; `enc_len` ignored when
    decoder-only). decoder_only, d 256, 4 layers, seq 256, vocab 320: about 28.8 MFLOP."""
    n_tokens = dec_len + (enc_len if cfg.has_encoder else 0)
    return flops_per_sequence(cfg, enc_len if cfg.has_encoder else 0, dec_len) / n_tokens


# Datasheet peak FLOP/s per device, dense (no structured sparsity), by compute dtype: "bfloat16"
# is the tensor-core / MXU bf16 peak with fp32 accumulation; "float32" the full-precision fp32
# peak (NVIDIA: CUDA cores, not TF32). XLA's default fp32 matmul precision on NVIDIA GPUs uses
# TF32-class passes, so a JAX float32 run can exceed its float32 "peak": compare bf16 runs. Matched
# against the framework's device name (case-insensitive whole words, first match wins, so the
# specific names come before the general ones). Sources: NVIDIA's H200, H100, A100, L4 and
# RTX 4090 datasheets; Google Cloud's TPU v4 / v5e / v5p pages.
DATASHEET_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
    ("L4", {"bfloat16": 121e12, "float32": 30.3e12}),
    ("RTX 4090", {"bfloat16": 165e12, "float32": 82.6e12}),
    ("TPU v4", {"bfloat16": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
)


def datasheet_peak(device: str, dtype: str) -> float | None:
    """The datasheet peak FLOP/s of `device` (a framework's device name) in `dtype`, or None
    when the table does not know the pair."""
    name = device.lower()
    for key, peaks in DATASHEET_PEAK_FLOPS:  # whole words: "L4" is not "L40S", "H200" not "GH200"
        if re.search(rf"\b{re.escape(key.lower())}\b", name):
            return peaks.get(dtype)
    return None
