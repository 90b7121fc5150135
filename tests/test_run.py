"""`tnt.run.Run` driven from Python, without the command line: a fresh run writes its folder
and checkpoints, `Run.resume` continues it and refuses a changed model, and a second run in the
same folder is refused without touching it."""

from __future__ import annotations

import math

import pytest

from tnt.checkpoint_meta import CheckpointError
from tnt.config import ConfigError, build_run_config
from tnt.run import Run


def test_fit_resume_and_refusals_from_python(corpus, tmp_path, capsys):
    cfg = build_run_config("cpu-tiny", {"data": corpus, "max_steps": 2, "seq_len": 16,
                                        "eval_every": 2, "ckpt_every": 2},
                           ["eval_batches=1", "sample_tokens=0", "analysis_every=0"])
    out = tmp_path / "run"
    run = Run(cfg, out=out, backend="torch")
    val = run.fit()
    assert math.isfinite(val) and run.trainer.step_count == 2
    assert run.cfg.model.vocab_size == 259  # fitted to the byte tokenizer
    assert (out / "config.json").is_file() and (out / "checkpoints" / "2").is_dir()
    assert any((out / "tb").iterdir())

    more = Run.resume(out, backend="torch", overrides={"max_steps": 3})
    assert math.isfinite(more.fit()) and more.trainer.step_count == 3
    assert more.meta["step"] == 2 and (out / "checkpoints" / "3").is_dir()
    assert "final val loss" in capsys.readouterr().out

    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="cannot resume with a different config: n_decoder_layers"):
        Run.resume(out, backend="torch", sets=["n_decoder_layers=5"]).fit()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Run(cfg, out=out, backend="torch").fit()
    with pytest.raises(CheckpointError, match="written by the torch backend"):
        Run.resume(out, backend="jax").fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
