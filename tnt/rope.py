"""Position tables for both frameworks (docs/design.md, "RoPE"), computed once in float64 numpy.

`rotate_half_tables` serve the standard rotary embedding TnT uses: pairs (x[i], x[i + dh/2])
rotated by angle `pos * base^(-2i/dh)`.

`position_tables` is what both frameworks' `RoPE` read: each (mode, length, head dim, base) is
built once per process and shared, read-only.

`reference_tables` serve `rope_mode="ngpt_reference"`, a compatibility option that reproduces the
public nGPT code's `apply_rotary_position_embeddings` exactly, for models trained with that code.
That function is not a rotation (NVIDIA/ngpt#10): it builds interleaved sinusoidal embeddings
`emb[p, 2j] = sin(p f_j)`, `emb[p, 2j+1] = cos(p f_j)`, splits them by halves into what it calls
`sin` (first half) and `cos` (second half), and returns
    out[2i] = -x[2i+1] * cos_half[i],    out[2i+1] = x[2i] * sin_half[i]
(no `x * cos` term). Use it only to import such checkpoints; never to train new models.
"""

from __future__ import annotations

import functools

import numpy as np


def rotate_half_tables(length: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [L, dh/2] float32 for frequencies base^(-2i/dh), positions 0..L-1."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def reference_tables(length: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """The nGPT reference's (`sin` half, `cos` half) [L, dh/2] float32; see the module doc."""
    inv_freq = np.exp(np.arange(0, head_dim, 2, dtype=np.float64) * (-np.log(base) / head_dim))
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.zeros((length, head_dim))
    emb[:, 0::2], emb[:, 1::2] = np.sin(angles), np.cos(angles)
    half = head_dim // 2
    return emb[:, :half].astype(np.float32), emb[:, half:].astype(np.float32)


def reference_swap_table(length: int, head_dim: int, base: float) -> np.ndarray:
    """The reference transform as one [L, dh] table T (T[2i] = -cos_half[i], T[2i+1] =
    sin_half[i]), so that `out = swap_pairs(x) * T` with `swap_pairs` exchanging x[2i], x[2i+1]."""
    sin_half, cos_half = reference_tables(length, head_dim, base)
    table = np.empty((length, head_dim), np.float32)
    table[:, 0::2], table[:, 1::2] = -cos_half, sin_half
    return table


@functools.lru_cache(maxsize=32)
def position_tables(rope_mode: str, length: int, head_dim: int, base: float) -> tuple[np.ndarray, ...]:
    """The tables of `rope_mode`'s transform for positions 0..length-1, built once (the 32 latest
    kept) and read-only: (cos, sin) [L, dh/2] for "rotate", the swap table [L, dh] for
    "ngpt_reference"."""
    if rope_mode == "ngpt_reference":
        tables = (reference_swap_table(length, head_dim, base),)
    elif rope_mode == "rotate":
        tables = rotate_half_tables(length, head_dim, base)
    else:
        raise ValueError(f"rope_mode must be 'rotate' or 'ngpt_reference', got {rope_mode!r}")
    for t in tables:
        t.flags.writeable = False
    return tables
