"""The torch forward reads nothing back from the device (on a GPU each read is a host sync, per
microbatch): the train step, evaluation and the scorer run under a guard that fails on any
device-to-host read inside `TnT.forward`, with and without padding, and give what the public,
self-checking call gives. Padding is decided where the batch is built (`tnt.data.has_pad`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_tokens, tiny_config

import tnt_torch.model as torch_model
from tnt.config import RunConfig, TrainConfig
from tnt.data import has_pad
from tnt_torch.backend import Trainer, token_sums
from tnt_torch.model import TnT, loss_fn
from tnt_torch.score import label_logprobs

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu")
# fp32: a loss of a few nats through a few hundred roundings of 2^-24 each stays well under this
TOL = 1e-5


class Guard:
    """While `on`, any Tensor read-back inside `TnT.forward` raises; counts the forwards run and
    records whether each attention call got a mask (`None`: SDPA's unmasked fast path)."""

    def __init__(self, monkeypatch) -> None:
        self.on, self.depth, self.forwards, self.masks = True, 0, 0, []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._refusing(name, getattr(torch.Tensor, name)))
        forward, attend = TnT.forward, torch_model.attend

        def guarded_forward(model, *args, **kwargs):
            self.depth += 1
            self.forwards += self.on
            try:
                return forward(model, *args, **kwargs)
            finally:
                self.depth -= 1

        def recording_attend(q, k, v, mask, scale):
            self.masks.append(mask.keep is not None)
            return attend(q, k, v, mask, scale)

        monkeypatch.setattr(TnT, "forward", guarded_forward)
        monkeypatch.setattr(torch_model, "attend", recording_attend)

    def _refusing(self, name: str, original):
        def method(tensor, *args, **kwargs):
            if self.on and self.depth:
                raise AssertionError(f"Tensor.{name} reads the device inside TnT.forward")
            return original(tensor, *args, **kwargs)
        return method

    def reference(self, fn, *args, **kwargs):
        """`fn` with the guard off (the public call reads the ids back to check them)."""
        self.on = False
        try:
            return fn(*args, **kwargs)
        finally:
            self.on = True


@pytest.fixture
def guard(monkeypatch) -> Guard:
    return Guard(monkeypatch)


def make_batch(cfg, padding: bool, B: int = 4, Le: int = 6, Ld: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    dec = random_tokens(rng, (B, Ld + 1), cfg.vocab_size)
    batch = {"dec_tokens": dec[:, :-1], "labels": dec[:, 1:]}
    if cfg.has_encoder:
        batch["enc_tokens"] = random_tokens(rng, (B, Le), cfg.vocab_size)
    if padding:  # ragged ends; row 1 of the encoder input is all pad (no visible key)
        for row in range(1, B):
            dec[row, Ld + 1 - 2 * row:] = cfg.pad_id
        if cfg.has_encoder:
            batch["enc_tokens"][1] = cfg.pad_id
            batch["enc_tokens"][2, 3:] = cfg.pad_id
    assert has_pad(batch, cfg.pad_id) == padding
    return batch


def tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v.astype(np.int64)) for k, v in batch.items()}


def test_the_guard_catches_a_read(guard):
    cfg = tiny_config("decoder_only")
    with pytest.raises(AssertionError, match="reads the device"):
        TnT(cfg)(None, tensors(make_batch(cfg, False))["dec_tokens"])  # check_ids reads the ids


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("padding", [False, True])
def test_train_step_evaluation_and_scorer_read_nothing_in_the_forward(arch, padding, guard):
    cfg = RunConfig(tiny_config(arch), TrainConfig(batch_size=4, seq_len=8, enc_len=6,
                                                   grad_accum=2, max_steps=5))
    trainer = Trainer(cfg, device="cpu")
    batch = make_batch(cfg.model, padding)
    with torch.no_grad():
        before = guard.reference(lambda: [float(v) for v in loss_fn(trainer.net, tensors(batch))])
    guard.masks.clear()
    step_loss = float(trainer.step(batch)["loss"])
    assert guard.forwards == 2  # both microbatches ran guarded
    assert abs(step_loss - before[0]) <= TOL * before[0]
    assert any(guard.masks) == padding  # without padding every attention takes the fast path

    with torch.no_grad():
        after, count = guard.reference(lambda: [float(v) for v in loss_fn(trainer.net, tensors(batch))])
    assert abs(trainer.evaluate(iter([batch])) - after) <= TOL * after
    nats, tokens = token_sums(trainer.net, cfg)(batch)
    assert tokens == count and abs(nats - after * count) <= TOL * after * count
    logp, _ = label_logprobs(trainer.net, batch)
    assert abs(-logp.sum() - after * count) <= TOL * after * count
    assert guard.forwards == 2 + 2 + 2 + 1


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_unknown_padding_builds_the_masks_and_changes_no_value(arch, monkeypatch):
    """Told nothing (`padded=None`) without the id check, the forward builds the masks instead of
    reading the batch: on a batch without pad that is the fast path's math, in float64 to 1e-12,
    values and gradients; fully masked rows stay exactly 0."""
    cfg = tiny_config(arch)
    model = TnT(cfg).double()
    for padding in (False, True):
        batch = tensors(make_batch(cfg, padding))
        results = []
        for padded in (padding, None):
            model.zero_grad(set_to_none=True)
            loss, _ = loss_fn(model, batch, check_ids=False, padded=padded)
            loss.backward()
            results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (known, grads), (unknown, grads_unknown) = results
        assert np.isfinite(known) and abs(known - unknown) <= 1e-12 * known
        for name, g in grads.items():
            assert torch.isfinite(g).all(), name
            torch.testing.assert_close(grads_unknown[name], g, rtol=1e-12, atol=1e-12)
    if cfg.has_encoder:  # the all-pad encoder row: its attention output is exactly 0
        enc = tensors(make_batch(cfg, True))["enc_tokens"]
        captured, attend = [], torch_model.attend
        monkeypatch.setattr(torch_model, "attend", lambda *a: captured.append(attend(*a)) or captured[-1])
        with torch.no_grad():
            model.encode(enc, check_ids=False)
        assert captured and all(bool((y[1] == 0).all()) for y in captured)
