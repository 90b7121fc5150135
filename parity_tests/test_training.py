"""Training parity: from the same weights and batches, 5 steps of each framework's own optimizer
(clip, Adam, eigen LRs, schedule, unit-norm projection) give the same parameters and losses.

Both sides use what users call: tnt_jax.optim.build_optimizer + tnt_jax.train.make_train_step,
and tnt_torch.build_optimizer (its `step()` does clip, AdamW, eigen LRs, schedule, projection).
"""

import numpy as np
import pytest

from experiments.parity import config, models, train_both
from tnt.config import TrainConfig
from tnt.params import param_specs

STEPS = 5


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("norm", ["ngpt", "rmsnorm"])
def test_five_steps_give_the_same_parameters(arch, norm, device, tol, report):
    cfg = config(arch, norm)
    # rmsnorm: a short warmup and weight decay, so both are exercised within 5 steps.
    train_cfg = TrainConfig(max_steps=STEPS, warmup_steps=2 if norm == "rmsnorm" else None)
    j, t, j_losses, t_losses = train_both(cfg, train_cfg, device, STEPS)
    assert report("loss per step", j_losses, t_losses) <= tol["loss"]
    worst = max((float(np.abs(j[n] - t[n]).max()), n) for n in j)
    assert report(f"params, worst {worst[1]}", worst[0], 0.0) <= tol["params"], worst
    for name, spec in param_specs(cfg).items():
        if spec.project_axis is not None:
            for side in (j, t):
                np.testing.assert_allclose(np.linalg.norm(side[name], axis=spec.project_axis), 1.0,
                                           atol=tol["sphere"], err_msg=name)
    moved = max(float(np.abs(t[n] - v).max()) for n, v in models(cfg, device)[2].items())
    assert moved > 100 * tol["params"]  # the comparison is not between untouched weights
