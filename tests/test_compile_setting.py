"""The `compile` config field: parsing, the auto rule per device, and the refusals (FSDP2 with
torch.compile, `compile=false` for the always-jitted JAX step). The compiled torch step's
values are tested in test_torch_train.py."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from tnt.config import ConfigError, RunConfig, TrainConfig, build_run_config
from tnt_torch.train import want_compile


@pytest.mark.parametrize("word,value", [("true", True), ("false", False), ("none", None)])
def test_compile_parses_true_false_and_none(word, value):
    assert build_run_config("cpu", sets=[f"compile={word}"]).train.compile is value
    assert TrainConfig().compile is None


def test_compile_refuses_a_non_bool():
    with pytest.raises(ConfigError, match="compile=.*maybe.*not a valid bool"):
        build_run_config("cpu", sets=["compile=maybe"])
    with pytest.raises(ConfigError, match="compile must be true, false or none"):
        TrainConfig(compile="yes")


def test_compile_with_fsdp_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="compile=true is not supported with fsdp=true: FSDP2"):
        TrainConfig(compile=True, fsdp=True)
    assert TrainConfig(compile=False, fsdp=True).fsdp


@pytest.mark.parametrize("compile,fsdp,device,expected", [
    (None, False, "cpu", False), (None, False, "cuda", True), (None, True, "cuda", False),
    (True, False, "cpu", True), (False, False, "cuda", False)])
def test_auto_compiles_on_cuda_only(compile, fsdp, device, expected):
    cfg = TrainConfig(compile=compile, fsdp=fsdp)
    assert want_compile(cfg, torch.device(device)) is expected


def test_jax_refuses_compile_false():
    from tnt_jax.backend import Trainer as JaxTrainer

    cfg = RunConfig(tiny_config(), TrainConfig(compile=False, batch_size=2, seq_len=8))
    with pytest.raises(ConfigError, match="compile=false applies to --backend torch"):
        JaxTrainer(cfg)
