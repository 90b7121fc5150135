"""`python -m experiments.pretrain` end to end on tiny configs: run dir, TensorBoard events,
checkpoints, exact resume, and refusals that leave what was written untouched."""

import importlib
import math
import os
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.pretrain import main
from tnt.backend import BACKENDS, Backend, BackendUnavailable, Trainer
from tnt.backend import backend as backend_module


def run(corpus, out, backend, *extra):
    args = ["--backend", backend, "--preset", "cpu-tiny", "--data", corpus, "--out", str(out),
            "--max-steps", "6", "--eval-every", "3", "--ckpt-every", "3", "--seq-len", "16",
            "--set", "eval_batches=2", "--set", "log_every=2", "--set", "sample_tokens=4",
            *extra]
    return main(args)


def final_params(backend, run_dir):
    module = importlib.import_module(f"tnt_{backend}")
    model, cfg, _ = module.load_checkpoint(run_dir)
    return module.to_canonical(model), cfg


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_writes_events_checkpoints_and_reports(backend, corpus, tmp_path, capsys):
    assert run(corpus, tmp_path / "run", backend) == 0
    out = capsys.readouterr().out
    assert "final val loss" in out and "sample:" in out
    loss, bpb = map(float, re.search(r"final val loss ([0-9.]+) nats/token \(([0-9.]+) bits/byte\)",
                                     out).groups())
    # byte tokens: one per byte, and an eos per document that counts no byte
    assert loss / math.log(2) < bpb < 1.01 * loss / math.log(2)
    assert (tmp_path / "run" / "config.json").is_file()
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["3", "6"]
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_sec", "train/grad_norm",
            "val/loss"} <= tags
    assert "dyn/alpha/decoder.layers.0.attn" in tags
    assert not [t for t in tags if t.startswith("alpha/")]  # each metric once
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    assert all(np.isfinite(e.value) for e in acc.Scalars("train/loss"))
    params, cfg = final_params(backend, tmp_path / "run")
    assert cfg.train.max_steps == 6 and cfg.model.vocab_size == 259


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_equals_an_uninterrupted_run(backend, corpus, tmp_path):
    horizon = ["--set", "decay_steps=6"]  # the same schedule whether the run stops at 3 or 6
    assert run(corpus, tmp_path / "full", backend, *horizon) == 0
    assert run(corpus, tmp_path / "cut", backend, *horizon, "--max-steps", "3") == 0
    step = tmp_path / "cut" / "checkpoints" / "3"  # a step folder that is a link (moved disks)
    step.rename(tmp_path / "elsewhere")
    step.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert run(corpus, tmp_path / "cut", backend, *horizon, "--resume") == 0
    full, _ = final_params(backend, tmp_path / "full")
    resumed, _ = final_params(backend, tmp_path / "cut")
    for name in full:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals_leave_existing_runs_untouched(backend, corpus, tmp_path, capsys):
    assert run(corpus, tmp_path / "run", backend, "--max-steps", "3") == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert run(corpus, tmp_path / "run", backend) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert run(corpus, tmp_path / "run", backend, "--resume", "--set", "d_model=32") == 2
    assert "d_model: 32 != 64" in capsys.readouterr().err
    assert run(corpus, tmp_path / "run", backend, "--resume", "--seed", "5") == 2
    assert "seed: 5 != 0" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_paths_are_named(backend, corpus, tmp_path, capsys):
    assert run(str(tmp_path / "nope"), tmp_path / "run", backend) == 2
    assert "data path" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert run(corpus, tmp_path / "empty", backend, "--resume") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(corpus, tmp_path / "run2", backend, "--max-steps", "3") == 0
    ckpt = tmp_path / "run2" / "checkpoints" / "3"
    for f in [p for p in ckpt.rglob("*") if p.is_file()  # jax: meta/metadata; torch: meta.json
              and any(part.startswith("meta") for part in p.relative_to(ckpt).parts)]:
        f.write_text("{ corrupt")
    assert run(corpus, tmp_path / "run2", backend, "--resume") == 2
    assert "checkpoint" in capsys.readouterr().err


def test_unknown_backend_is_refused(corpus, tmp_path):
    with pytest.raises(SystemExit):
        run(corpus, tmp_path / "run", "tensorflow")
    assert not os.path.exists(tmp_path / "run")


def _protocol_members(proto) -> dict:
    return {m: v for m, v in vars(proto).items()
            if not m.startswith("_") and (callable(v) or isinstance(v, property | staticmethod))}


@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_implements_the_backend_protocol(name):
    import inspect

    module = backend_module(name)
    assert module.name == name
    members = _protocol_members(Backend)
    assert {"start", "trainer", "load", "token_sums", "token_logprobs", "generate"} <= set(members)
    for member, proto in members.items():
        impl = getattr(module, member, None)
        assert callable(impl), f"tnt_{name}.backend lacks {member}"
        want = list(inspect.signature(proto).parameters)[1:]  # a module function has no self
        assert list(inspect.signature(impl).parameters)[:len(want)] == want, member
    cls = module.Trainer
    members = _protocol_members(Trainer)
    assert {"step", "evaluate", "sample", "restore", "step_count"} <= set(members)
    for member, proto in members.items():
        impl = inspect.getattr_static(cls, member, None)
        assert impl is not None, f"{cls.__name__} lacks {member}"
        assert type(impl) is type(proto), member  # property, staticmethod or plain method
        if callable(proto):
            want = list(inspect.signature(proto).parameters)
            assert list(inspect.signature(impl).parameters)[:len(want)] == want, member
    assert cls.name == name


def test_an_unknown_or_missing_backend_names_the_fix(monkeypatch):
    with pytest.raises(BackendUnavailable, match="unknown backend 'tensorflow'; choose from jax, torch"):
        backend_module("tensorflow")
    import builtins
    import sys

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tnt_torch.backend", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(BackendUnavailable, match=r'needs torch, which is not installed: '
                                                 r'pip install -e "\.\[torch\]"'):
        backend_module("torch")


def test_sample_tokens_zero_ends_without_a_sample(corpus, tmp_path, capsys):
    assert run(corpus, tmp_path / "run", "jax", "--max-steps", "1", "--set", "sample_tokens=0") == 0
    out = capsys.readouterr().out
    assert "final val loss" in out and "sample:" not in out


@pytest.mark.parametrize("name", BACKENDS)
def test_the_guard_names_non_finite_parameters_read_as_flags(name, tmp_path):
    """Before a save the guard asks the backend which parameters are not finite (reduced on the
    device) instead of copying every weight to the host."""
    from tnt.config import build_run_config
    from tnt.run import nonfinite

    cfg = build_run_config("cpu-tiny")
    backend = backend_module(name).trainer(cfg)
    assert backend.nonfinite() == []
    bad = "decoder.layers.0.mlp.w_out"
    if name == "jax":
        params = dict(backend.state.params)
        params[bad] = params[bad].at[0, 0].set(float("nan"))
        backend.state = backend.state._replace(params=params)
    else:
        import torch

        with torch.no_grad():
            dict(backend.net.named_parameters())[bad].view(-1)[0] = float("inf")
    assert backend.nonfinite() == [bad]
    assert nonfinite(None, backend) == f"non-finite parameters ({bad})"
