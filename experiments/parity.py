"""Cross-framework parity in float32: from the same canonical weights, tnt_jax and tnt_torch give
the same logits, and after a few steps of each framework's own optimizer the same weights.

The parity suite (`parity_tests/`) and `python -m experiments.doctor --full` both run these
cases; the doctor runs them on whatever device both frameworks see and reports, per case, the
largest differences beside `tolerances`, which are derived from fp32's rounding, not measured.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import tnt_jax
import tnt_torch
from tnt.config import ModelConfig, TrainConfig
from tnt.params import param_specs
from tnt_jax.model import merge_params, split_params
from tnt_jax.optim import build_optimizer
from tnt_jax.train import TrainState, make_train_step, model_graph

CASES = [(a, n, act) for a in ("encoder_decoder", "decoder_only") for n in ("ngpt", "rmsnorm")
         for act in ("gelu", "silu")]
U32 = 2.0 ** -24  # float32's unit roundoff: a rounded result is within U32 relative of the exact one
SAFETY = 10.0  # rounding errors do not cancel as independent ones would; the margin allows for that
OPS_PER_LAYER = 16  # sequential rounded operations a layer puts between its input and output


def config(arch: str, norm: str, activation: str = "gelu") -> ModelConfig:
    """The parity model: tiny, with every kind of layer (two of each stack) and four heads."""
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


def jax_device(device: str) -> jax.Device:
    return jax.devices("gpu" if device == "gpu" else "cpu")[0]


def torch_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "gpu" else "cpu")


def models(cfg: ModelConfig, device: str, seed: int = 0):
    """(jax model, torch model, canonical weights): the weights come from torch's init (JAX's
    eager init compiles every op it runs), loaded into an abstract JAX model on `device`."""
    tm = tnt_torch.TnT(cfg, seed=seed)
    weights = tnt_torch.to_canonical(tm)
    with jax.default_device(jax_device(device)):
        jm = tnt_jax.load_canonical(nnx.eval_shape(lambda: tnt_jax.TnT(cfg, nnx.Rngs(0))), weights)
    return jm, tm.to(torch_device(device)), weights


def jax_batch(batch: dict[str, np.ndarray], device: str) -> dict[str, jax.Array]:
    return {k: jax.device_put(jnp.asarray(v), jax_device(device)) for k, v in batch.items()}


def torch_batch(batch: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v.astype(np.int64), device=torch_device(device))
            for k, v in batch.items()}


@contextlib.contextmanager
def full_precision_matmuls() -> Iterator[None]:
    """fp32 matmuls in full precision in both frameworks: XLA's "highest" precision (its GPU
    default uses reduced-precision passes), no TF32 in torch; restores the previous settings."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@functools.cache
def _jax_forward(cfg: ModelConfig):
    """The jitted logits of a config's model as a function of its canonical parameters: built
    once per process, so repeating a case (with other weights) compiles once."""
    graphdef = model_graph(cfg)
    return graphdef, jax.jit(lambda p, e, d: merge_params(graphdef, p)(e, d))


@functools.cache
def _jax_step(cfg: ModelConfig, train_cfg: TrainConfig):
    """(optimizer, jitted train step) of a config, built once per process like `_jax_forward`."""
    tx = build_optimizer(cfg, train_cfg)
    return tx, make_train_step(_jax_forward(cfg)[0], tx)


def train_both(cfg: ModelConfig, train_cfg: TrainConfig, device: str, steps: int, built=None):
    """`steps` steps of each framework's own train step and optimizer on the same batches, from
    `built` (a `models` triple) or fresh `models`: (jax params, torch params, jax losses, torch
    losses), the parameters as canonical numpy dicts."""
    jm, tm, _ = built or models(cfg, device)
    _, params = split_params(jm)
    tx, step = _jax_step(cfg, train_cfg)
    # committed to the device, as the step's outputs are: the second step then reuses the first's
    # executable instead of compiling again
    state = jax.device_put(TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)),
                           jax_device(device))
    opt = tnt_torch.build_optimizer(tm, cfg, train_cfg)
    j_losses, t_losses = [], []
    for seed in range(steps):
        b = padded_batch(cfg, seed=seed)
        state, metrics = step(state, jax_batch(b, device))
        j_losses.append(float(metrics["loss"]))
        loss, _ = tnt_torch.loss_fn(tm, torch_batch(b, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_losses.append(float(loss.detach()))
    j_params = {k: np.asarray(v) for k, v in jax.device_get(state.params).items()}
    return j_params, tnt_torch.to_canonical(tm), j_losses, t_losses


def tolerances(cfg: ModelConfig, train_cfg: TrainConfig, steps: int, logit_scale: float,
               weight_scale: float) -> dict[str, float]:
    """The largest fp32 difference two correct implementations may show, per quantity.

    A dot product of K terms summed in another order differs by about sqrt(K) u times the sum of
    the terms' magnitudes (u = 2^-24, rounding errors of random sign). nGPT's normalized vectors
    and RMSNorm keep activations of order one, so each of the n sequential operations of the
    forward adds that relative error: the logits may differ by `rel = SAFETY * n * sqrt(K) * u`
    times max(1, their largest magnitude `logit_scale`), with K the longest contraction (d_model,
    the MLP's F or the sequence) and n = OPS_PER_LAYER per layer of the deepest path (encoder
    then decoder) plus the embedding and the head; the mean loss likewise. The backward pass runs
    the chain again, so a gradient is within `2 rel` of its magnitude; Adam's step is a ratio of
    gradients and inherits that relative error, so each update moves a weight apart by
    `2 rel lr m` (m the largest eigen-LR multiplier) and rounds it by `SAFETY sqrt(d) u` of its
    magnitude `weight_scale` (the projection's norm sums d squares): `steps` times both. The
    projected rows are unit-norm to that same `SAFETY sqrt(d) u`.
    """
    t = train_cfg.resolved(cfg.norm)
    depth = (cfg.n_encoder_layers if cfg.has_encoder else 0) + cfg.n_decoder_layers
    width = max(cfg.d_model, cfg.hidden, cfg.max_len_encoder, cfg.max_len_decoder)
    rel = SAFETY * (OPS_PER_LAYER * depth + 2) * math.sqrt(width) * U32
    rounding = SAFETY * math.sqrt(cfg.d_model) * U32
    multiplier = max(s.eigen_lr for s in param_specs(cfg).values())
    return {"logits": rel * max(logit_scale, 1.0), "loss": rel * max(logit_scale, 1.0),
            "params": steps * (2 * rel * t.lr * multiplier + rounding * weight_scale),
            "sphere": rounding}


def cases(accelerator: bool) -> list[tuple[str, str]]:
    """(arch, norm) of the doctor's cases: all four on an accelerator; on the CPU the one that
    compiles fastest yet has every nGPT scaler and the projection (decoder-only nGPT)."""
    if accelerator:
        return [(a, n) for a in ("encoder_decoder", "decoder_only") for n in ("ngpt", "rmsnorm")]
    return [("decoder_only", "ngpt")]


def run_case(arch: str, norm: str, device: str, steps: int, built=None) -> dict:
    """One parity case on `device` ("cpu" or "gpu"): the largest absolute differences of the
    logits (before training), the per-step losses and the weights after `steps` steps, and of
    the projected rows' norms from 1, each beside its `tolerances` entry, and whether all pass.
    `built` replaces the `models` triple (a test perturbs one side's weights)."""
    cfg = config(arch, norm)
    # rmsnorm: a short warmup and weight decay, so both are exercised within a few steps
    train_cfg = TrainConfig(max_steps=steps, warmup_steps=2 if norm == "rmsnorm" else None)
    with full_precision_matmuls():
        jm, tm, weights = built = built or models(cfg, device)
        b = padded_batch(cfg)
        jb, tb = jax_batch(b, device), torch_batch(b, device)
        forward = _jax_forward(cfg)[1]
        j_logits = np.asarray(forward(split_params(jm)[1], jb.get("enc_tokens"), jb["dec_tokens"]))
        with torch.no_grad():
            t_logits = tm(tb.get("enc_tokens"), tb["dec_tokens"]).cpu().numpy()
        j, t, j_losses, t_losses = train_both(cfg, train_cfg, device, steps, built)
    sphere = max((float(np.abs(np.linalg.norm(np.asarray(side[n], np.float64), axis=s.project_axis)
                                - 1.0).max())
                  for n, s in param_specs(cfg).items() if s.project_axis is not None
                  for side in (j, t)), default=0.0)
    diffs = {"logits": _max_abs(j_logits, t_logits), "loss": _max_abs(j_losses, t_losses),
             "params": max(_max_abs(j[n], t[n]) for n in j), "sphere": sphere}
    tol = tolerances(cfg, train_cfg, steps, float(np.abs(j_logits).max()),
                     max(float(np.abs(w).max()) for w in weights.values()))
    return {"case": f"{arch}/{norm}", "device": device, "steps": steps, "max_abs_diff": diffs,
            "tolerance": tol, "pass": all(diffs[k] <= tol[k] for k in diffs)}


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check(device: str, steps: int) -> list[dict]:
    """Every doctor case on `device`: "gpu" runs all four, "cpu" the one."""
    return [run_case(arch, norm, device, steps) for arch, norm in cases(device == "gpu")]
