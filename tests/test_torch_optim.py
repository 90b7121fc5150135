"""tnt_torch.optim: unit-norm projection, eigen learning rates, clipping, schedule, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_tokens, tiny_config
from torch import nn
from torch.nn.utils import parametrize

from tnt.config import TrainConfig
from tnt.params import param_specs
from tnt.schedule import learning_rate
from tnt_torch.model import TnT, l2norm, loss_fn, to_canonical
from tnt_torch.optim import TnTOptimizer, UnitNormProjection, clip_grad_norm


def batch_for(cfg, rng, batch=4, enc_len=10, dec_len=8):
    dec = random_tokens(rng, (batch, dec_len))
    out = {"dec_tokens": torch.from_numpy(dec), "labels": torch.from_numpy(np.roll(dec, -1, 1))}
    if cfg.has_encoder:
        out["enc_tokens"] = torch.from_numpy(random_tokens(rng, (batch, enc_len)))
    return out


def train_steps(model, opt, cfg, rng, n):
    for _ in range(n):
        loss, _ = loss_fn(model, batch_for(cfg, rng))
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_after_a_step_every_matrix_is_unit_norm_and_scalers_are_not_projected(arch, rng):
    cfg = tiny_config(arch, "ngpt")
    model = TnT(cfg, seed=0)
    before = to_canonical(model)
    opt = TnTOptimizer(model, cfg, TrainConfig(lr=1e-2, max_steps=10))
    train_steps(model, opt, cfg, rng, 2)
    after = to_canonical(model)
    for name, spec in param_specs(cfg).items():
        assert not np.array_equal(after[name], before[name]), f"{name} was not updated"
        if spec.project_axis is not None:
            norms = np.linalg.norm(after[name].astype(np.float64), axis=spec.project_axis)
            np.testing.assert_allclose(norms, 1.0, atol=1e-6, err_msg=name)
        else:  # a scaler: moved by Adam, never normalized
            assert abs(np.linalg.norm(after[name]) - 1.0) > 1e-3, name


def test_rmsnorm_matrices_are_not_projected(rng):
    cfg = tiny_config("decoder_only", "rmsnorm")
    model = TnT(cfg, seed=0)
    opt = TnTOptimizer(model, cfg, TrainConfig(lr=1e-2, max_steps=10))
    assert opt.projection is None
    train_steps(model, opt, cfg, rng, 1)
    norms = np.linalg.norm(to_canonical(model)["decoder.embed"], axis=1)
    assert np.abs(norms - 1.0).max() > 0.1


def test_projection_is_batched_and_exact():
    torch.manual_seed(0)
    ps = [torch.randn(6, 4) for _ in range(3)] + [torch.randn(4, 6), torch.randn(5, 4)]
    expected = [l2norm(p, 0) for p in ps[:3]] + [l2norm(ps[3], 1), l2norm(ps[4], 0)]
    proj = UnitNormProjection([(p, 0) for p in ps[:3]] + [(ps[3], 1), (ps[4], 0)])
    assert len(proj.groups) == 2  # one group per axis
    proj()
    for p, e in zip(ps, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)  # equal up to rounding


class TimesConstant(nn.Module):
    """The reference reparametrization: stored `s`, used as `s * m` in the forward."""

    def __init__(self, m: float) -> None:
        super().__init__()
        self.m = m

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored * self.m

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value / self.m


def test_eigen_lr_equals_the_reference_reparametrization(rng):
    """Scalers stored at `scale` and multiplied by init/scale in the forward, trained with one lr,
    the stored gradients clipped (the nGPT reference), equal scalers stored at their effective
    value with TnT's optimizer (gradients times init/scale before the clip and Adam, updates
    times init/scale after), over 10 steps, in float64 with Adam's default eps and a clip
    that acts on every step."""
    cfg = tiny_config("encoder_decoder", "ngpt", n_decoder_layers=1)
    lr, clip = 1e-3, 0.05
    train = TrainConfig(lr=lr, min_lr=lr, max_steps=10, grad_clip=clip)  # constant lr
    ours, ref, plain = (TnT(cfg, seed=0).double() for _ in range(3))
    specs = param_specs(cfg)
    modules = dict(ref.named_modules())

    def ref_param(name: str):
        owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
        return getattr(modules[owner], attr)

    for name, spec in specs.items():
        if spec.eigen_lr != 1.0:
            owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
            parametrize.register_parametrization(modules[owner], attr,
                                                 TimesConstant(spec.eigen_lr))
    for model in (ours, ref, plain):  # only the scalers learn: the matrices stay identical
        for name, p in model.named_parameters():
            p.requires_grad_("parametrizations" in name or specs.get(name).init_std is None)
            if name in specs and specs[name].project_axis is not None:
                with torch.no_grad():  # on the sphere in float64, as TnT's projection keeps them
                    p.copy_(l2norm(p, specs[name].project_axis))
    runs = [(ours, TnTOptimizer(ours, cfg, train), None)]
    for model in (ref, plain):  # plain: one lr for everything, no multipliers at all
        adam = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
        runs.append((model, adam, [p for p in model.parameters() if p.requires_grad]))
    # Every id appears several times, so no embedding row sees a near-zero gradient.
    ids = np.stack([rng.permutation(np.arange(3, 40)) for _ in range(8)]).astype(np.int32)
    batch = {"enc_tokens": torch.from_numpy(ids[:4, :12]), "dec_tokens": torch.from_numpy(
        ids[4:, :16]), "labels": torch.from_numpy(ids[4:, 16:32])}
    clipped = 0
    for _ in range(10):
        for model, optimizer, learned in runs:
            loss, _ = loss_fn(model, batch)
            loss.backward()
            if learned is not None:  # clip the stored gradients' global norm, no epsilon
                total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in learned]))
                clipped += model is ref and bool(total > clip)
                for p in learned:
                    p.grad.mul_(torch.clamp(clip / total, max=1.0))
            optimizer.step()
            optimizer.zero_grad()
    assert clipped == 10
    with torch.no_grad():
        ref_values = {n: ref_param(n).numpy().copy() for n in specs}
    ours_values = {n: p.detach().numpy() for n, p in ours.named_parameters()}
    for name, value in ours_values.items():
        np.testing.assert_allclose(value, ref_values[name], rtol=1e-10, atol=1e-12, err_msg=name)
    moved = np.abs(ours_values["s_z"] - 1.0).max()
    plain_s_z = plain.s_z.detach().numpy()
    assert np.abs(plain_s_z - 1.0).max() < moved / 3  # the multiplier matters


def test_groups_carry_eigen_lrs_and_decay_only_on_matrices():
    cfg = tiny_config("encoder_decoder", "rmsnorm")
    model = TnT(cfg, seed=0)
    opt = TnTOptimizer(model, cfg, TrainConfig(max_steps=10))
    names = {p: n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            spec = param_specs(cfg)[names[p]]
            assert group["weight_decay"] == (0.1 if spec.is_matrix else 0.0)
            assert group["eigen_lr"] == spec.eigen_lr
    cfg = tiny_config("encoder_decoder", "ngpt")
    model = TnT(cfg, seed=0)
    opt = TnTOptimizer(model, cfg, TrainConfig(max_steps=10))
    by_name = {names_p: g["eigen_lr"] for g in opt.param_groups
               for names_p in (n for n, p in model.named_parameters()
                               if any(p is q for q in g["params"]))}
    assert by_name["s_z"] == pytest.approx(np.sqrt(32))
    assert by_name["decoder.layers.0.attn.alpha"] == pytest.approx(0.05 * np.sqrt(32))
    assert by_name["decoder.layers.0.mlp.s_uv"] == 1.0
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_schedule_sets_group_lr_from_the_shared_formula(rng):
    cfg = tiny_config("decoder_only", "rmsnorm", n_decoder_layers=1)
    model = TnT(cfg, seed=0)
    train = TrainConfig(max_steps=6, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    opt = TnTOptimizer(model, cfg, train)
    for k in range(6):
        train_steps(model, opt, cfg, rng, 1)
        expected = learning_rate(k, 1e-3, 1e-4, 2, 6)
        assert all(g["lr"] == pytest.approx(expected * g["eigen_lr"], rel=1e-12)
                   for g in opt.param_groups)
    assert opt.step_count == 6


def test_clipping_acts_on_the_gradients_times_their_multipliers():
    ps = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
    ps[0].grad, ps[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    groups = [([ps[0]], 2.0), ([ps[1]], 1.0)]
    # returns ||g|| as the gradients came; clips ||m g|| = sqrt(4 * 27 + 64)
    assert float(clip_grad_norm(groups, 1.0)) == pytest.approx(np.sqrt(27 + 64), rel=1e-6)
    stored = np.sqrt(4 * 27 + 64)
    assert torch.allclose(ps[0].grad, torch.full((3,), 6.0 / stored))
    assert torch.allclose(ps[1].grad, torch.full((4,), 4.0 / stored))
    ps[0].grad, ps[1].grad = torch.full((3,), 0.1), torch.full((4,), 0.1)
    clip_grad_norm(groups, 1.0)
    assert torch.all(ps[0].grad == 0.2) and torch.all(ps[1].grad == 0.1)  # below: scaled only


def test_canonical_state_round_trip_continues_identically(rng):
    cfg = tiny_config("decoder_only", "ngpt", n_decoder_layers=1)
    train = TrainConfig(max_steps=8)
    a = TnT(cfg, seed=0)
    opt_a = TnTOptimizer(a, cfg, train)
    train_steps(a, opt_a, cfg, rng, 3)
    b = TnT(cfg, seed=5)
    from tnt_torch.model import load_canonical

    load_canonical(b, to_canonical(a))
    opt_b = TnTOptimizer(b, cfg, train)
    opt_b.load_canonical_state(opt_a.canonical_state(), opt_a.step_count)
    batches = [batch_for(cfg, rng) for _ in range(2)]
    for model, opt in ((a, opt_a), (b, opt_b)):
        for batch in batches:
            loss, _ = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
    pa, pb = to_canonical(a), to_canonical(b)
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)
    with pytest.raises(KeyError, match="missing"):
        opt_b.load_canonical_state({}, 0)


def test_optimizer_refuses_a_model_of_another_config():
    model = TnT(tiny_config("decoder_only", "ngpt"), seed=0)
    with pytest.raises(KeyError, match="do not match the config"):
        TnTOptimizer(model, tiny_config("encoder_decoder", "ngpt"), TrainConfig())
