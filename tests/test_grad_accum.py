"""Gradient accumulation (`grad_accum`) in both frameworks: N microbatches give the update of one
batch of the same global size, with the loss weighted by each microbatch's label tokens.

The batches are padded unevenly, so weighting microbatch means equally (instead of by their token
counts) would fail. `grad_clip` is small enough that clipping acts every step, so clipping each
microbatch's gradient instead of the accumulated one would fail too. Tolerance: 1e-5 (fp32),
relative to the largest gradient entry / absolute on parameters of O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import random_tokens, tiny_config

from tnt.config import ConfigError, RunConfig, TrainConfig
from tnt_jax import train as jax_train
from tnt_jax.backend import Trainer as JaxTrainer
from tnt_jax.model import TnT, split_params
from tnt_jax.optim import build_optimizer
from tnt_jax.train import TrainState, make_eval_step, make_train_step
from tnt_torch.backend import Trainer as TorchTrainer
from tnt_torch.train import accumulate_grads, microbatches

TOL = 1e-5
STEPS = 3
# compiled as the train step runs it: run eagerly, every operation of the model compiles alone
jit_accumulate_grads = jax.jit(jax_train.accumulate_grads, static_argnums=(0, 3))


def padded_batch(cfg, seed: int, B: int = 8, Le: int = 6, Ld: int = 8) -> dict[str, np.ndarray]:
    """Rows padded at their ends by different amounts (row 0 keeps all 8 labels, row 7 only 1)."""
    rng = np.random.default_rng(seed)
    dec = random_tokens(rng, (B, Ld + 1), cfg.vocab_size)
    for row in range(B):
        dec[row, Ld + 1 - row:] = cfg.pad_id
    batch = {"dec_tokens": dec[:, :-1], "labels": dec[:, 1:]}
    if cfg.has_encoder:
        batch["enc_tokens"] = random_tokens(rng, (B, Le), cfg.vocab_size)
    return batch


def run_config(arch: str, norm: str, grad_accum: int) -> RunConfig:
    train = TrainConfig(max_steps=10, batch_size=8, seq_len=8, enc_len=6, grad_clip=0.05,
                        grad_accum=grad_accum, warmup_steps=1 if norm == "rmsnorm" else None)
    return RunConfig(tiny_config(arch, norm), train)


@pytest.mark.parametrize("arch,norm", [("encoder_decoder", "ngpt"), ("decoder_only", "rmsnorm")])
def test_jax_microbatch_gradients_equal_the_big_batch(arch, norm):
    cfg = tiny_config(arch, norm)
    graphdef, params = split_params(TnT(cfg, nnx.Rngs(0)))
    batch = {k: jnp.asarray(v) for k, v in padded_batch(cfg, 0).items()}
    loss1, count1, g1 = jit_accumulate_grads(graphdef, params, batch, 1)
    for n in (2, 4):
        loss, count, g = jit_accumulate_grads(graphdef, params, batch, n)
        assert int(count) == int(count1) == 8 * 9 // 2
        assert abs(float(loss) - float(loss1)) <= TOL * abs(float(loss1))
        scale = max(float(jnp.abs(v).max()) for v in g1.values())
        for name in g1:
            diff = float(jnp.abs(g[name] - g1[name]).max())
            assert diff <= TOL * scale, (n, name, diff, scale)


def test_jax_mean_of_microbatch_means_would_differ():
    """The batch is uneven enough that averaging the microbatch gradients unweighted is detectably
    wrong: the token weighting in JAX's `accumulate_grads` is what the equality above tests."""
    cfg = tiny_config("decoder_only", "ngpt")
    graphdef, params = split_params(TnT(cfg, nnx.Rngs(0)))
    batch = {k: jnp.asarray(v) for k, v in padded_batch(cfg, 0).items()}
    g1 = jit_accumulate_grads(graphdef, params, batch, 1)[2]
    halves = [jit_accumulate_grads(graphdef, params, {k: v[i::2] for k, v in batch.items()}, 1)[2]
              for i in range(2)]
    scale = max(float(jnp.abs(v).max()) for v in g1.values())
    worst = max(float(jnp.abs((halves[0][n] + halves[1][n]) / 2 - g1[n]).max()) for n in g1)
    assert worst > 100 * TOL * scale


def clipped_loss(metrics: dict, cfg: RunConfig) -> float:
    """The step's loss, after checking that clipping acted on the accumulated gradient."""
    assert float(metrics["grad_norm"]) > cfg.train.grad_clip
    return float(metrics["loss"])


def jax_train(cfg: RunConfig, batches) -> tuple[dict, list[float]]:
    backend = JaxTrainer(cfg)
    losses = [clipped_loss(backend.step(b), cfg) for b in batches]
    return {k: np.asarray(v) for k, v in backend.state.params.items()}, losses


def torch_train(cfg: RunConfig, batches) -> tuple[dict, list[float]]:
    backend = TorchTrainer(cfg, device="cpu")
    losses = [clipped_loss(backend.step(b), cfg) for b in batches]
    return {n: p.detach().numpy().copy() for n, p in backend.net.named_parameters()}, losses


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("arch,norm", [("encoder_decoder", "ngpt"), ("decoder_only", "rmsnorm")])
def test_accumulated_steps_equal_big_batch_steps(framework, arch, norm):
    train = jax_train if framework == "jax" else torch_train
    one = run_config(arch, norm, 1)
    batches = [padded_batch(one.model, s) for s in range(STEPS)]
    p1, l1 = train(one, batches)
    p4, l4 = train(run_config(arch, norm, 4), batches)
    np.testing.assert_allclose(l4, l1, rtol=TOL)
    moved = max(float(np.abs(p1[n] - v).max()) for n, v in train(one, batches[:0])[0].items())
    assert moved > 100 * TOL  # the weights did move: the comparison is not between inits
    for name in p1:
        np.testing.assert_allclose(p4[name], p1[name], atol=TOL, err_msg=name)


def test_torch_microbatch_gradients_equal_the_big_batch():
    cfg = run_config("encoder_decoder", "ngpt", 1)
    backend = TorchTrainer(cfg, device="cpu")
    batch = backend._put(padded_batch(cfg.model, 0))
    grads = {}
    for n in (1, 2, 4):
        backend.net.zero_grad(set_to_none=True)
        loss, count = accumulate_grads(backend.replica, batch, n)
        grads[n] = (float(loss), int(count),
                    {k: p.grad.clone() for k, p in backend.net.named_parameters()})
    loss1, count1, g1 = grads[1]
    scale = max(float(g.abs().max()) for g in g1.values())
    for n in (2, 4):
        loss, count, g = grads[n]
        assert count == count1 == 36 and abs(loss - loss1) <= TOL * loss1
        for name in g1:
            assert float((g[name] - g1[name]).abs().max()) <= TOL * scale, (n, name)


def test_microbatch_split_is_the_same_in_both_frameworks():
    batch = {"labels": np.arange(24).reshape(8, 3), "dec_tokens": np.arange(8)[:, None]}
    from tnt_jax.train import microbatches as jax_microbatches

    j = jax_microbatches({k: jnp.asarray(v) for k, v in batch.items()}, 4)
    t = microbatches({k: torch.as_tensor(v) for k, v in batch.items()}, 4)
    for i in range(4):
        for k in batch:
            np.testing.assert_array_equal(np.asarray(j[k][i]), t[i][k].numpy())
    np.testing.assert_array_equal(np.asarray(j["dec_tokens"][1, :, 0]), [1, 5])


def test_bad_grad_accum_is_refused():
    with pytest.raises(ConfigError, match="grad_accum=3"):
        TrainConfig(batch_size=8, grad_accum=3)
    cfg = tiny_config("decoder_only")
    graphdef, params = split_params(TnT(cfg, nnx.Rngs(0)))
    tx = build_optimizer(cfg, TrainConfig())
    with pytest.raises(ValueError, match="grad_accum"):
        make_train_step(graphdef, tx, 0)
    step = make_train_step(graphdef, tx, 3)
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    batch = {k: jnp.asarray(v) for k, v in padded_batch(cfg, 0).items()}
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        step(state, batch)
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):  # evaluation too
        make_eval_step(graphdef, 3)(params, batch)
    with pytest.raises(ValueError, match="grad_accum=3"):
        microbatches({"labels": torch.zeros(8, 2)}, 3)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_evaluation_runs_microbatches_and_gives_the_big_batch_loss(framework, monkeypatch):
    """Evaluation holds no more activations than a training microbatch: with grad_accum=4 it runs
    4 microbatches, and their token-weighted loss is the whole batch's (fp32 summation order only:
    36 label tokens, so a relative difference of at most ~36 x 2^-24 = 2e-6, under TOL)."""
    batches = [padded_batch(tiny_config(), s) for s in range(2)]
    if framework == "jax":
        import jax

        backends = [JaxTrainer(run_config("encoder_decoder", "ngpt", n)) for n in (1, 4)]
        jaxpr = jax.make_jaxpr(backends[1]._eval_step)(backends[1].state.params,
                                                        backends[1]._put(batches[0]))
        assert "scan" in str(jaxpr) and "scan" not in str(jax.make_jaxpr(backends[0]._eval_step)(
            backends[0].state.params, backends[0]._put(batches[0])))
    else:
        import tnt_torch.train as torch_train_module

        rows = []
        real = torch_train_module.loss_fn
        monkeypatch.setattr(torch_train_module, "loss_fn",
                            lambda model, b, **kw: rows.append(len(b["labels"])) or real(model, b, **kw))
        backends = [TorchTrainer(run_config("encoder_decoder", "ngpt", n), device="cpu")
                    for n in (1, 4)]
    one, four = (b.evaluate(iter(batches)) for b in backends)
    if framework == "torch":
        assert rows == [8, 8] + [2] * 8
    assert abs(four - one) <= TOL * one
