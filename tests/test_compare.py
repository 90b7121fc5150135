"""experiments.compare: the steps-to-match arithmetic, and a tiny nGPT-vs-RMSNorm run end to end."""

import json

import numpy as np
import pytest
from PIL import Image

from experiments import analyze, compare


def test_steps_to_reach_interpolates_between_evaluations():
    steps, losses = np.array([10, 20, 30, 40]), np.array([5.0, 4.0, 3.0, 2.5])
    assert compare.steps_to_reach(steps, losses, 3.5) == pytest.approx(25.0)
    assert compare.steps_to_reach(steps, losses, 3.0) == pytest.approx(30.0)
    assert compare.steps_to_reach(steps, losses, 6.0) == 10.0  # already there at the first eval
    assert compare.steps_to_reach(steps, losses, 2.0) is None  # never reached


def test_summary_reports_speedup_or_never():
    base = {"step": np.array([10, 20]), "loss": np.array([5.0, 4.0]), "seconds": np.array([1.0, 2.0])}
    fast = {"step": np.array([10, 20]), "loss": np.array([4.5, 3.0]), "seconds": np.array([2.0, 4.0])}
    s = compare.summarize({"rmsnorm": base, "ngpt": fast})
    # nGPT crosses 4.0 a third of the way from step 10 (4.5) to step 20 (3.0)
    assert s["ngpt_steps_to_match"] == pytest.approx(10 + 10 / 3)
    assert s["step_speedup"] == pytest.approx(20 / (10 + 10 / 3))
    assert s["ngpt_seconds_to_match"] == pytest.approx(2 + 2 / 3)
    assert s["time_speedup"] == pytest.approx(2 / (2 + 2 / 3))
    s = compare.summarize({"rmsnorm": fast, "ngpt": base})
    assert s["ngpt_steps_to_match"] is None and s["step_speedup"] is None
    assert "never reached" in compare.report(s)


def test_tiny_compare_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--preset", "cpu-tiny", "--data", corpus, "--max-steps", "4", "--eval-every", "2",
            "--out", str(out), "--set", "seq_len=16", "--set", "eval_batches=1",
            "--set", "sample_tokens=2"]
    assert compare.main(args) == 0
    printed = capsys.readouterr().out
    assert "baseline (rmsnorm) final val loss" in printed and "compare.png" in printed
    summary = json.loads((out / "summary.json").read_text())
    for norm in ("ngpt", "rmsnorm"):
        cfg = json.loads((out / norm / "config.json").read_text())
        assert cfg["model"]["norm"] == norm and cfg["train"]["max_steps"] == 4
        assert summary["curves"][norm]["step"] == [2, 4]
        assert all(np.isfinite(summary["curves"][norm]["seconds"]))
    ngpt, base = (json.loads((out / n / "config.json").read_text()) for n in ("ngpt", "rmsnorm"))
    same = {k: v for k, v in ngpt["model"].items() if k not in ("norm",)}
    assert same == {k: v for k, v in base["model"].items() if k not in ("norm",)}
    assert ngpt["train"]["seed"] == base["train"]["seed"]
    assert ngpt["train"]["batch_size"] == base["train"]["batch_size"]
    assert summary["baseline_final_val_loss"] == pytest.approx(summary["curves"]["rmsnorm"]["loss"][-1])
    if summary["ngpt_steps_to_match"] is None:
        assert "never reached" in printed
    else:
        assert "step ratio" in printed
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size == (int(analyze.FIGSIZE[0] * analyze.DPI),
                                                  int(analyze.FIGSIZE[1] * analyze.DPI))
    # a second call resumes the finished runs (nothing retrained) and re-plots
    assert compare.main(args) == 0
    assert json.loads((out / "summary.json").read_text())["curves"] == summary["curves"]
