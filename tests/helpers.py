"""Tiny configs and token helpers shared by the tests (imported as `helpers`: a module named
`conftest` would clash with parity_tests' when both folders run in one pytest session)."""

from __future__ import annotations

import numpy as np

from tnt.config import ModelConfig


def tiny_config(arch: str = "encoder_decoder", norm: str = "ngpt", **kw) -> ModelConfig:
    base = dict(arch=arch, norm=norm, vocab_size=40, d_model=32, n_heads=2, n_encoder_layers=1,
                n_decoder_layers=2, max_len_encoder=16, max_len_decoder=16)
    base.update(kw)
    return ModelConfig(**base)


ARCH_NORMS = [(a, n) for a in ("encoder_decoder", "decoder_only") for n in ("ngpt", "rmsnorm")]


def random_tokens(rng: np.random.Generator, shape, vocab: int = 40) -> np.ndarray:
    """Ids in [3, vocab): never pad/bos/eos."""
    return rng.integers(3, vocab, size=shape).astype(np.int32)
