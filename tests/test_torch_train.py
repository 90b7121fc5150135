"""tnt_torch.backend.Trainer and tnt_torch.checkpoint: learning, exact restore, checkpoint
files and refusals, validation at the boundary, decoding. (`experiments.pretrain` with
`--backend torch` end to end is in test_pretrain.py.)"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import random_tokens, tiny_config

from tnt import checkpoint_io
from tnt.checkpoint_meta import CheckpointError
from tnt.config import RunConfig, TrainConfig
from tnt.tokenizer import ByteTokenizer
from tnt_torch import checkpoint, load_checkpoint, to_canonical
from tnt_torch.backend import Trainer as TorchTrainer
from tnt_torch.generate import inference
from tnt_torch.model import loss_fn

SPEC = {"kind": "byte", "vocab_size": 259}


def run_config(arch="decoder_only", norm="ngpt", **train) -> RunConfig:
    base = dict(max_steps=10, batch_size=4, seq_len=8, enc_len=8)
    base.update(train)
    return RunConfig(tiny_config(arch, norm, n_decoder_layers=1), TrainConfig(**base))


def batch_for(cfg: RunConfig, rng) -> dict[str, np.ndarray]:
    t = cfg.train
    dec = random_tokens(rng, (t.batch_size, t.seq_len))
    out = {"dec_tokens": dec, "labels": np.roll(dec, -1, axis=1)}
    if cfg.model.has_encoder:
        out["enc_tokens"] = random_tokens(rng, (t.batch_size, t.encoder_len))
    return out


@pytest.mark.parametrize("arch,norm", [("decoder_only", "ngpt"), ("encoder_decoder", "rmsnorm")])
def test_tiny_model_overfits_a_fixed_batch(arch, norm, rng):
    cfg = run_config(arch, norm, lr=2e-2, min_lr=2e-2, max_steps=40)  # constant lr
    backend = TorchTrainer(cfg)
    batch = batch_for(cfg, rng)
    first = float(backend.step(batch)["loss"])
    for _ in range(39):
        metrics = backend.step(batch)
    assert float(metrics["loss"]) < 0.25 * first
    assert int(metrics["tokens"]) == 32 and np.isfinite(float(metrics["grad_norm"]))
    assert backend.step_count == 40


def test_save_restore_continues_exactly(tmp_path, rng):
    cfg = run_config("encoder_decoder", "ngpt")
    batches = [batch_for(cfg, rng) for _ in range(5)]
    a = TorchTrainer(cfg)
    a.open(tmp_path / "ckpt", keep=2)
    for b in batches[:3]:
        a.step(b)
    a.save(SPEC)
    b_ = TorchTrainer(cfg)
    meta = b_.restore(tmp_path / "ckpt")
    assert meta["step"] == 3 and b_.step_count == 3 and meta["backend"] == "torch"
    for backend in (a, b_):
        for b in batches[3:]:
            backend.step(b)
    pa, pb = to_canonical(a.net), to_canonical(b_.net)
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)
    assert read_meta(tmp_path / "ckpt")["step"] == 3


def test_checkpoint_files_atomic_layout_and_keep(tmp_path, rng):
    cfg = run_config()
    backend = TorchTrainer(cfg)
    backend.open(tmp_path, keep=2)
    for _ in range(3):
        backend.step(batch_for(cfg, rng))
        backend.save(SPEC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]  # no temp folders left
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == [
        "meta.json", "optimizer.safetensors", "params.safetensors"]
    meta = json.loads((tmp_path / "3" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["tokenizer"] == SPEC
    params, opt, _ = checkpoint.restore(tmp_path / "3", cfg.model)
    assert params["decoder.embed"].dtype == np.float32
    assert opt["decoder.embed.step"].shape == () and float(opt["decoder.embed.step"]) == 3
    backend.save(SPEC)  # saving the same step again replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]


def test_load_checkpoint_gives_the_trained_model(tmp_path, rng):
    cfg = run_config("encoder_decoder", "rmsnorm")
    backend = TorchTrainer(cfg)
    backend.open(tmp_path / "checkpoints", keep=1)
    backend.step(batch_for(cfg, rng))
    backend.save(ByteTokenizer().spec)
    model, loaded_cfg, tok = load_checkpoint(tmp_path)
    assert loaded_cfg == cfg and isinstance(tok, ByteTokenizer)
    ours = to_canonical(backend.net)
    assert all(np.array_equal(v, ours[n]) for n, v in to_canonical(model).items())
    with pytest.raises(CheckpointError, match="d_model: 32 != 48"):
        load_checkpoint(tmp_path, expect=dataclasses.replace(cfg.model, d_model=48))


def test_checkpoint_refusals_name_the_problem(tmp_path, rng):
    cfg = run_config()
    backend = TorchTrainer(cfg)
    backend.open(tmp_path, keep=3)
    backend.step(batch_for(cfg, rng))
    backend.save(SPEC)
    other = RunConfig(dataclasses.replace(cfg.model, d_model=48, n_heads=4), cfg.train)
    with pytest.raises(CheckpointError, match="another model: d_model: 32 != 48"):
        TorchTrainer(other).restore(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "missing")
    params = tmp_path / "1" / "params.safetensors"
    good = params.read_bytes()
    params.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match="1 is corrupt or partial"):
        TorchTrainer(cfg).restore(tmp_path)
    params.write_bytes(good)
    (tmp_path / "1" / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        checkpoint.restore(tmp_path / "1", cfg.model)
    (tmp_path / "1" / "meta.json").write_text("{ corrupt")
    with pytest.raises(CheckpointError, match="metadata"):
        read_meta(tmp_path)
    jax_run = tmp_path / "jax" / "checkpoints" / "5"
    (jax_run / "meta").mkdir(parents=True)
    (jax_run / "state").mkdir()
    with pytest.raises(CheckpointError, match="jax backend"):
        read_meta(tmp_path / "jax")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no committed one"):
        read_meta(tmp_path / "empty")


def read_meta(path) -> dict:
    """The one reader's view of a torch run's latest checkpoint metadata."""
    return checkpoint_io.read_meta(*checkpoint_io.find_checkpoint(path, "torch"))


def test_bad_token_ids_are_refused_at_the_boundary(rng):
    cfg = run_config("encoder_decoder", "ngpt")
    backend = TorchTrainer(cfg)
    batch = batch_for(cfg, rng)
    batch["labels"][0, 3] = cfg.model.vocab_size
    with pytest.raises(ValueError, match="labels contain token id 40 at index"):
        backend.step(batch)
    batch = batch_for(cfg, rng)
    batch["enc_tokens"][1, 0] = -2
    with pytest.raises(ValueError, match="enc_tokens contain token id -2"):
        backend.evaluate([batch])
    assert backend.step_count == 0


def test_ids_are_checked_once_where_the_batch_enters(rng, monkeypatch):
    """The model's own id check (a device read) is not repeated per microbatch by the train and
    evaluation steps: their batches were checked on the host by `_put`."""
    cfg = run_config("encoder_decoder", "ngpt", grad_accum=2)
    backend = TorchTrainer(cfg)
    batch = batch_for(cfg, rng)

    def no_read(*args, **kwargs):
        raise AssertionError("the forward read the token ids back")

    monkeypatch.setattr(torch, "aminmax", no_read)
    backend.step(batch)
    backend.evaluate([batch])
    with pytest.raises(AssertionError, match="read the token ids back"):  # the public forward checks
        backend.net(torch.from_numpy(batch["enc_tokens"]), torch.from_numpy(batch["dec_tokens"]))
    assert backend.step_count == 1


def test_evaluate_is_the_token_weighted_mean(rng):
    cfg = run_config()
    backend = TorchTrainer(cfg)
    a, b = batch_for(cfg, rng), batch_for(cfg, rng)
    b["labels"][:, 2:] = cfg.model.pad_id  # b has 8 label tokens, a has 32
    losses = []
    with torch.no_grad():
        for batch in (a, b):
            loss, count = loss_fn(backend.net, {k: torch.from_numpy(v).long()
                                                for k, v in batch.items()})
            losses.append((float(loss), int(count)))
    expected = sum(x * c for x, c in losses) / sum(c for _, c in losses)
    assert backend.evaluate([a, b]) == pytest.approx(expected, rel=1e-6)


def test_the_end_of_run_sample_is_inference_and_stops_at_eos():
    cfg = run_config("encoder_decoder", "ngpt")
    tok = ByteTokenizer()
    backend = TorchTrainer(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=tok.vocab_size)))
    text = backend.sample(tok, "abc", 5)
    assert text == inference(backend.net, tok, "abc", max_length=5)
    assert len(text) <= 5  # at most one character per new byte
    with torch.no_grad():  # make eos the argmax everywhere: the sample is empty
        backend.net.lm_head.zero_()
        backend.net.lm_head[:, backend.cfg.model.eos_id] = 1.0
    assert backend.sample(tok, "abc", 5) == ""


def test_compiled_train_step_equals_the_eager_one(rng):
    """Loss and every gradient of the compiled blocks against eager. Inductor fuses elementwise
    ops and may reorder a reduction; reordering a sum of n fp32 terms moves it by at most
    (n - 1) u sum|terms| (u = 2^-24). Every quantity here is a unit vector or a softmax (bounded
    terms), the longest reduction is the MLP's hidden width, and each sublayer (attention, MLP,
    head) chains about three reductions: K = 3 sublayers x 3 x width roundoffs of each tensor's
    own largest magnitude. A wrong fusion moves these O(1) values by O(1)."""
    from torch._dynamo.utils import counters

    from tnt_torch.train import accumulate_grads

    cfg = run_config("decoder_only", "ngpt", compile=False)
    tensors = {k: torch.as_tensor(v, dtype=torch.int64) for k, v in batch_for(cfg, rng).items()}
    eager, compiled = TorchTrainer(cfg), TorchTrainer(run_config("decoder_only", "ngpt", compile=True))
    assert compiled.compiled and not eager.compiled
    graphs = counters["stats"]["unique_graphs"]
    (l0, _), (l1, _) = (accumulate_grads(b.replica, tensors) for b in (eager, compiled))
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks did go through dynamo
    K = 3 * 3 * cfg.model.hidden
    u = 2.0 ** -24
    assert abs(float(l1) - float(l0)) <= K * u * abs(float(l0))
    named = dict(compiled.net.named_parameters())
    for name, p in eager.net.named_parameters():
        g0, g1 = p.grad, named[name].grad
        torch.testing.assert_close(g1, g0, rtol=0, atol=K * u * float(g0.abs().max()), msg=name)


def test_a_failing_compile_falls_back_to_eager(rng):
    cfg = run_config("encoder_decoder", "ngpt", compile=False)
    batch = batch_for(cfg, rng)
    eager, backend = TorchTrainer(cfg), TorchTrainer(run_config("encoder_decoder", "ngpt", compile=True))
    assert backend.compiled

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    for stack in (backend.net.encoder, backend.net.decoder):
        for layer in stack.layers:
            layer._compiled_call_impl = broken
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        metrics = backend.step(batch)
    assert not backend.compiled
    assert float(metrics["loss"]) == float(eager.step(batch)["loss"])
    pa, pb = to_canonical(backend.net), to_canonical(eager.net)
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)


def test_bench_train_runs_the_torch_backend(capsys):
    from experiments import bench

    argv = ["train", "--backend", "torch", "--json", "--preset", "cpu-tiny", "--steps", "2",
            "--warmup", "1", "--matmul-size", "128", "--set", "vocab_size=40", "--set",
            "d_model=32", "--seq-len", "16", "--batch-size", "2", "--arch", "decoder_only"]
    assert bench.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "torch" and r["arch"] == "decoder_only" and r["steps"] == 2
    assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 32
