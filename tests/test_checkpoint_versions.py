"""Checkpoint format versions (tnt.checkpoint_meta): version 1 stored Adam's moments of the
effective scalers' gradients `g`, version 2 those of the stored gradients `m g`; both
backends convert a version-1 checkpoint on restore, and an unknown version is refused by name."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
import torch
from helpers import random_tokens, tiny_config

from tnt.checkpoint_meta import VERSION, CheckpointError, check_meta, make_meta
from tnt.config import RunConfig, TrainConfig
from tnt.params import param_specs
from tnt_jax import checkpoint as jax_checkpoint
from tnt_jax.backend import Trainer as JaxTrainer
from tnt_torch.backend import Trainer as TorchTrainer

SPEC = {"kind": "byte", "vocab_size": 259}
CFG = RunConfig(tiny_config("decoder_only", "ngpt", n_decoder_layers=1),
                TrainConfig(max_steps=10, batch_size=4, seq_len=8))


def batch(rng) -> dict[str, np.ndarray]:
    dec = random_tokens(rng, (4, 8))
    return {"dec_tokens": dec, "labels": np.roll(dec, -1, axis=1)}


def eigen_lrs() -> dict[str, float]:
    return {n: s.eigen_lr for n, s in param_specs(CFG.model).items()}


def test_jax_converts_a_version_1_checkpoint(tmp_path, rng):
    a = JaxTrainer(CFG)
    for _ in range(2):
        a.step(batch(rng))
    adam = a.state.opt_state[1]
    assert isinstance(adam, optax.ScaleByAdamState)
    # Version 1's optax state: clip_by_global_norm's EmptyState where the chain now has
    # (eigen-LR multipliers, clip); the leaves (and so the stored arrays) are the same.
    old_state = a.state._replace(opt_state=(optax.EmptyState(), *a.state.opt_state[1:]))
    meta = make_meta("jax", a.step_count, CFG, SPEC) | {"version": 1}
    manager = jax_checkpoint.open_manager(tmp_path / "checkpoints", keep=2)
    jax_checkpoint.save(manager, a.step_count, old_state._asdict(), meta)
    manager.wait_until_finished()
    b = JaxTrainer(CFG)
    b.restore(tmp_path)
    restored = b.state.opt_state[1]
    converted = 0
    for name, m in eigen_lrs().items():
        np.testing.assert_allclose(restored.mu[name], m * adam.mu[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(restored.nu[name], m * m * adam.nu[name], rtol=1e-6,
                                   err_msg=name)
        converted += m != 1.0
    assert converted > 0
    np.testing.assert_array_equal(b.state.params["s_z"], a.state.params["s_z"])


def test_torch_converts_a_version_1_checkpoint(tmp_path, rng):
    a = TorchTrainer(CFG)
    for _ in range(2):
        a.step(batch(rng))
    a.open(tmp_path / "checkpoints", keep=2)
    a.save(SPEC)
    meta_file = tmp_path / "checkpoints" / "2" / "meta.json"
    assert json.loads(meta_file.read_text())["version"] == VERSION == 2
    same = TorchTrainer(CFG)
    same.restore(tmp_path)  # the current version: restored as written
    meta_file.write_text(json.dumps(json.loads(meta_file.read_text()) | {"version": 1}))
    b = TorchTrainer(CFG)
    b.restore(tmp_path)
    before, now, unchanged = (x.opt.canonical_state() for x in (a, b, same))
    for name, m in eigen_lrs().items():
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            k = f"{name}.{key}"
            np.testing.assert_array_equal(unchanged[k], before[k])
            np.testing.assert_allclose(now[k], m ** power * before[k], rtol=1e-6, err_msg=k)
    assert now["s_z.step"] == before["s_z.step"] == 2
    loss_a = a.step(batch(np.random.default_rng(5)))["loss"]
    loss_b = b.step(batch(np.random.default_rng(5)))["loss"]
    assert torch.isclose(loss_a, loss_b)  # same parameters


def test_unknown_version_is_refused_by_name():
    meta = make_meta("torch", 3, CFG, SPEC)
    assert check_meta(meta, "here")["version"] == VERSION
    with pytest.raises(CheckpointError, match="here has checkpoint version 7, this TnT reads "
                                              "versions 1, 2"):
        check_meta(meta | {"version": 7}, "here")
