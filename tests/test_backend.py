"""tnt.backend: either framework's adapter loads a checkpoint with its metadata, and scores it
alike: `token_sums` (what `experiments.evaluate` adds up) and `token_logprobs` (per label, what
lm-eval loglikelihoods read) agree with each other and across frameworks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_tokens, tiny_config

from tnt.backend import BACKENDS, backend
from tnt.config import RunConfig, TrainConfig
from tnt.tokenizer import ByteTokenizer

CFG = RunConfig(tiny_config("encoder_decoder", "ngpt", vocab_size=259),
                TrainConfig(max_steps=2, batch_size=4, seq_len=8, enc_len=8, grad_accum=2))


def _batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    dec = random_tokens(rng, (4, 8), 259)
    labels = np.roll(dec, -1, axis=1)
    labels[0, 5:] = CFG.model.pad_id  # padding scores nothing
    return {"enc_tokens": random_tokens(rng, (4, 8), 259), "dec_tokens": dec, "labels": labels}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A torch run's step-1 checkpoint (the torch trainer builds fastest on the CPU)."""
    trainer = backend("torch").trainer(CFG)
    trainer.open(tmp_path_factory.mktemp("run") / "checkpoints", keep=1)
    trainer.step(_batch(np.random.default_rng(1)))
    trainer.save(ByteTokenizer().spec)
    return trainer.directory


@pytest.mark.parametrize("name", BACKENDS)
def test_load_brings_the_metadata(checkpoint, name):
    loaded = backend(name).load(checkpoint)
    assert loaded.cfg == CFG and loaded.step == 1 and loaded.meta["backend"] == "torch"
    assert isinstance(loaded.tokenizer, ByteTokenizer)


def test_token_logprobs_add_up_to_the_scored_nats_in_either_framework(checkpoint):
    batch = _batch(np.random.default_rng(2))
    valid = batch["labels"] != CFG.model.pad_id
    logprobs = {}
    for name in BACKENDS:
        b = backend(name)
        model = b.load(checkpoint).model
        lp = b.token_logprobs(model, batch)
        assert lp.shape == (4, 8) and lp.dtype == np.float32
        assert np.all(lp[~valid] == 0) and np.all(lp[valid] < 0)
        nats, count = b.token_sums(model, CFG)(batch)
        assert count == valid.sum()
        # fp32 sums of ~30 terms of magnitude log(259) ~ 5.6 (the scorer adds its microbatches)
        np.testing.assert_allclose(-lp.sum(dtype=np.float64), nats, rtol=1e-5)
        logprobs[name] = lp
    # the same parameters: the frameworks differ by fp32 rounding of O(1) logits
    np.testing.assert_allclose(logprobs["jax"], logprobs["torch"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_an_out_of_range_token_id_is_refused_by_name(checkpoint, name):
    b = backend(name)
    model = b.load(checkpoint).model
    batch = _batch(np.random.default_rng(3))
    batch["dec_tokens"][1, 2] = 259
    with pytest.raises(ValueError, match=r"dec_tokens contain token id 259 at index \(1, 2\)"):
        b.token_logprobs(model, batch)
    with pytest.raises(ValueError, match="token id 259"):
        b.token_sums(model, CFG)(batch)


def test_tnt_and_the_command_lines_import_no_framework():
    """Only `backend(name)` imports one: the CLIs (the JAX planner aside, which imports JAX when
    it runs) and `tnt` load without jax or torch. `experiments.parity` compares the two
    frameworks and imports both by design; the doctor imports it only for `--full`."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    modules = sorted({f"tnt.{p.stem}" for p in (root / "tnt").glob("*.py")}
                     | {f"experiments.{p.stem}" for p in (root / "experiments").glob("*.py")}
                     - {"experiments.parity"})
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted({m.split('.')[0] for m in sys.modules} & "
              "{'jax', 'flax', 'optax', 'orbax', 'torch', 'tnt_jax', 'tnt_torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
