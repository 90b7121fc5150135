"""Helpers for the parity tests: one tiny config, batches with padding, both frameworks' models
built from the same canonical weights, with the functions users call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import tnt_jax
import tnt_torch
from tnt.config import ModelConfig

CASES = [(a, n, act) for a in ("encoder_decoder", "decoder_only") for n in ("ngpt", "rmsnorm")
         for act in ("gelu", "silu")]


def config(arch: str, norm: str, activation: str = "gelu") -> ModelConfig:
    return ModelConfig(arch=arch, norm=norm, activation=activation, vocab_size=48, d_model=32,
                       n_heads=4, n_encoder_layers=2, n_decoder_layers=2, max_len_encoder=24,
                       max_len_decoder=24)


def padded_batch(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Uneven lengths: each row is padded at its end by a different amount (row 0 not at all);
    row 3's encoder input is all padding, so its cross-attention sees no key (output exactly 0)."""
    rng = np.random.default_rng(seed)
    B, Le, Ld = 4, 11, 9
    enc = rng.integers(3, cfg.vocab_size, (B, Le)).astype(np.int32)
    dec = rng.integers(3, cfg.vocab_size, (B, Ld + 1)).astype(np.int32)
    for row, (e_len, d_len) in enumerate([(Le, Ld + 1), (7, 6), (3, 4), (0, 8)]):
        enc[row, e_len:] = cfg.pad_id
        dec[row, d_len:] = cfg.pad_id
    batch = {"dec_tokens": dec[:, :-1], "labels": dec[:, 1:]}
    if cfg.has_encoder:
        batch["enc_tokens"] = enc
    return batch


def jax_device(device: str):
    return jax.devices("gpu" if device == "gpu" else "cpu")[0]


def torch_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "gpu" else "cpu")


def models(cfg: ModelConfig, device: str, seed: int = 0):
    """(jax model, torch model, canonical weights): the weights come from a JAX init."""
    with jax.default_device(jax_device(device)):
        jm = tnt_jax.TnT(cfg, nnx.Rngs(seed))
    weights = tnt_jax.to_canonical(jm)
    tm = tnt_torch.load_canonical(tnt_torch.TnT(cfg, seed=seed + 1), weights)
    return jm, tm.to(torch_device(device)), weights


def jax_batch(batch, device):
    return {k: jax.device_put(jnp.asarray(v), jax_device(device)) for k, v in batch.items()}


def torch_batch(batch, device):
    return {k: torch.as_tensor(v.astype(np.int64), device=torch_device(device))
            for k, v in batch.items()}
