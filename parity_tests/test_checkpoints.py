"""Checkpoints cross over: a run trained by one backend's pretrain loads, ready to use, in the
other framework (`tnt_torch.load_checkpoint`, `tnt_jax.load_checkpoint`), with the same logits."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tnt_jax
import tnt_torch
from experiments.pretrain import main as pretrain
from tnt.checkpoint_meta import CheckpointError
from tnt.config import ModelConfig

LOADERS = {"jax": tnt_jax.load_checkpoint, "torch": tnt_torch.load_checkpoint}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny encoder-decoder run per backend (4 steps, checkpoint at 2 and 4)."""
    root = tmp_path_factory.mktemp("xckpt")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"m{i}.py").write_text(f"value_{i} = {i} * {i}\n" * 40)
    out = {}
    for backend in ("jax", "torch"):
        out[backend] = root / backend
        assert pretrain(["--backend", backend, "--preset", "cpu-tiny", "--data", str(corpus),
                         "--out", str(out[backend]), "--max-steps", "4", "--ckpt-every", "2",
                         "--eval-every", "4", "--seq-len", "12", "--set", "eval_batches=1",
                         "--set", "sample_tokens=2"]) == 0
    return out


def logits(framework, model, enc, dec):
    if framework == "jax":
        return np.asarray(model(jnp.asarray(enc), jnp.asarray(dec)))
    with torch.no_grad():
        return model(torch.as_tensor(enc.astype(np.int64)),
                     torch.as_tensor(dec.astype(np.int64))).numpy()


@pytest.mark.parametrize("writer, reader", [("jax", "torch"), ("torch", "jax")])
def test_a_run_of_one_backend_loads_in_the_other(runs, writer, reader, report):
    native, cfg, tok = LOADERS[writer](runs[writer])
    other, other_cfg, other_tok = LOADERS[reader](runs[writer])
    assert other_cfg == cfg and other_tok.spec == tok.spec
    assert cfg.model.arch == "encoder_decoder" and cfg.train.max_steps == 4
    rng = np.random.default_rng(0)
    enc = rng.integers(3, cfg.model.vocab_size, (2, 12)).astype(np.int32)
    dec = rng.integers(3, cfg.model.vocab_size, (2, 12)).astype(np.int32)
    enc[1, 7:] = cfg.model.pad_id
    a, b = logits(writer, native, enc, dec), logits(reader, other, enc, dec)
    assert report(f"logits, {writer} ckpt in {reader}", a, b) <= 1e-5
    trained = (tnt_jax.to_canonical if reader == "jax" else tnt_torch.to_canonical)(other)
    assert not np.allclose(trained["decoder.layers.0.attn.alpha"], 0.05)  # trained, not init


@pytest.mark.parametrize("reader", ["jax", "torch"])
def test_bad_checkpoints_are_refused_clearly(runs, reader, tmp_path):
    load = LOADERS[reader]
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a TnT checkpoint"):
        load(runs["jax"] / "tb")
    with pytest.raises(CheckpointError, match=r"does not match the expected model: d_model"):
        load(runs["torch"], expect=ModelConfig(d_model=32, n_heads=2))
    for writer in ("jax", "torch"):
        broken = tmp_path / f"broken-{writer}-{reader}"
        shutil.copytree(runs[writer] / "checkpoints" / "4", broken / "4")
        if writer == "torch":
            data = (broken / "4" / "params.safetensors").read_bytes()
            (broken / "4" / "params.safetensors").write_bytes(data[: len(data) // 2])
        else:
            for f in (broken / "4" / "state").rglob("*"):
                if f.is_file() and f.parent.name == "d":
                    f.write_bytes(b"")
        with pytest.raises(CheckpointError, match="corrupt or partial"):
            load(broken)
