"""experiments.compare: sweep bookkeeping (best rate, mean/spread, reuse, JSON, plot) on tiny runs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import analyze, compare
from experiments.compare import Run


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


def curve(final):
    return {"step": np.array([1, 2]), "loss": np.array([9.0, final]), "seconds": np.array([1.0, 2.0])}


def test_best_rate_is_the_lowest_seed_mean_and_never_a_failed_rate():
    runs = [Run("ngpt", lr, s) for lr in (1e-3, 2e-3, 4e-3) for s in (0, 1)]
    finals = {1e-3: (3.0, 3.2), 2e-3: (2.9, 2.5), 4e-3: (1.0, float("nan"))}
    curves = {r: curve(finals[r.lr][r.seed]) for r in runs}
    rows = compare.rate_table(runs, curves, "ngpt")
    by_lr = {r["lr"]: r for r in rows}
    assert by_lr[1e-3]["mean"] == pytest.approx(3.1)
    assert by_lr[1e-3]["std"] == pytest.approx(np.std([3.0, 3.2], ddof=1))
    assert by_lr[2e-3]["min"] == 2.5 and by_lr[2e-3]["max"] == 2.9 and by_lr[2e-3]["n"] == 2
    assert not by_lr[4e-3]["complete"] and by_lr[4e-3]["finals"] == [1.0, None]
    assert compare.best_rate(rows, "ngpt")["lr"] == 2e-3  # 4e-3 has a lower seed but a NaN one
    curves[Run("ngpt", 2e-3, 0)] = None  # a failed run
    curves[Run("ngpt", 1e-3, 0)] = None
    with pytest.raises(compare.CompareError, match="no ngpt rate finished"):
        compare.best_rate(compare.rate_table(runs, curves, "ngpt"), "ngpt")


def test_mean_curve_averages_seeds_on_common_steps():
    a = {"step": np.array([1, 2, 3]), "loss": np.array([3.0, 2.0, 1.0]), "seconds": np.array([1.0, 2, 3])}
    b = {"step": np.array([1, 3]), "loss": np.array([5.0, 3.0]), "seconds": np.array([3.0, 5])}
    m = compare.mean_curve([a, b])
    assert m["step"].tolist() == [1, 3] and m["loss"].tolist() == [4.0, 2.0]
    assert m["seconds"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize("flag,value,message", [
    ("--ngpt-lrs", "", "is empty"), ("--rmsnorm-lrs", "1e-3,-2e-3", "not > 0: -0.002"),
    ("--ngpt-lrs", "fast", "comma-separated numbers"), ("--seeds", "0", "--seeds must be >= 1")])
def test_bad_sweep_input_is_refused(flag, value, message, tmp_path, capsys):
    assert compare.main(["--preset", "cpu-tiny", flag, value, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_data_without_text_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert compare.main(["--preset", "cpu-tiny", "--data", str(tmp_path / "empty"),
                         "--out", str(tmp_path / "x")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused(corpus, tmp_path, capsys):
    (tmp_path / "x").write_text("keep")
    assert compare.main(["--preset", "cpu-tiny", "--data", corpus, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create run directory --out") and "Traceback" not in err
    assert (tmp_path / "x").read_text() == "keep"


def sweep_args(corpus, out, seeds):
    return ["--preset", "cpu-tiny", "--data", corpus, "--max-steps", "3", "--eval-every", "1",
            "--ngpt-lrs", "4e-3,1e-2", "--rmsnorm-lrs", "1e-3,3e-3", "--seeds", str(seeds),
            "--out", str(out), "--set", "seq_len=16", "--set", "eval_batches=1",
            "--set", "sample_tokens=0", "--set", "analysis_every=0"]


def local_mc_task(root: Path) -> Path:
    """A two-question multiple-choice task for lm-evaluation-harness (YAML + jsonl, offline)."""
    root.mkdir()
    rows = [{"q": "def f(x):", "choices": ["\n    return x", " zzz"], "a": 0},
            {"q": "x = 1 +", "choices": [" 2", "\n\n\n"], "a": 0}]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yaml").write_text(
        f"task: cmp_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n")
    return root


def test_tiny_sweep_end_to_end_reuses_finished_runs(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert compare.main(sweep_args(corpus, out, 1)) == 0
    capsys.readouterr()
    # a larger sweep over the same --out trains only the missing second seed
    assert compare.main(sweep_args(corpus, out, 2)) == 0
    printed = capsys.readouterr().out
    assert "run 8/8" in printed and printed.count(": reused") == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_runs"] == 8 and len(summary["runs"]) == 8
    assert set(summary) >= {"settings", "rates", "best_lr", "units", "runs", "curves",
                            "baseline_final_val_loss", "ngpt_final_val_loss", "ngpt_steps_to_match",
                            "ngpt_seconds_to_match", "step_speedup", "time_speedup",
                            "baseline_final_bits_per_byte", "ngpt_final_bits_per_byte"}
    for norm, rates in (("ngpt", [4e-3, 1e-2]), ("rmsnorm", [1e-3, 3e-3])):
        rows = summary["rates"][norm]
        assert [r["lr"] for r in rows] == rates and all(r["n"] == 2 for r in rows)
        finals = {r["lr"]: [x["final_val_loss"] for x in summary["runs"]
                            if x["norm"] == norm and x["lr"] == r["lr"]] for r in rows}
        for r in rows:
            assert r["mean"] == pytest.approx(np.mean(finals[r["lr"]]))
            assert r["std"] == pytest.approx(np.std(finals[r["lr"]], ddof=1))
        best = min(rows, key=lambda r: r["mean"])
        assert summary["best_lr"][norm] == best["lr"]
        cfgs = [json.loads((Path(x["dir"]) / "config.json").read_text()) for x in summary["runs"]
                if x["norm"] == norm]
        assert {c["train"]["lr"] for c in cfgs} == set(rates)
        assert {c["train"]["seed"] for c in cfgs} == {0, 1}
        assert all(c["train"]["max_steps"] == 3 and c["model"]["norm"] == norm for c in cfgs)
        assert summary["curves"][norm]["step"] == [1, 2, 3]
    base = next(r for r in summary["rates"]["rmsnorm"] if r["lr"] == summary["best_lr"]["rmsnorm"])
    assert summary["baseline_final_val_loss"] == pytest.approx(base["mean"])
    u = summary["units"]
    assert u["bits_per_byte_per_nat"] == pytest.approx(u["val_tokens"] / u["val_bytes"] / np.log(2))
    assert "<- best" in printed and "bits/byte" in printed
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size == (int(analyze.FIGSIZE[0] * 1.5 * analyze.DPI),
                                                  int(analyze.FIGSIZE[1] * analyze.DPI))
    # everything is there: a third call trains nothing and reports the same numbers, plus the
    # best-rate runs scored on held-out text and on a local harness task
    held = Path(corpus).parent / "held_out.txt"
    held.write_text("def held(out):\n    return out\n" * 40)
    tasks = local_mc_task(tmp_path / "tasks")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert compare.main(sweep_args(corpus, out, 2) + ["--eval-data", str(held), "--tasks", "cmp_mc",
                                                      "--include-path", str(tasks)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": reused") == 8 and "held-out" in printed and "cmp_mc: ngpt" in printed
    again = json.loads((out / "summary.json").read_text())
    assert again["rates"] == summary["rates"] and again["curves"] == summary["curves"]
    for norm in ("ngpt", "rmsnorm"):
        scored = again["held_out"][norm]["runs"]
        assert len(scored) == 2 and all(r["data"] == str(held) for r in scored)
        assert {Path(r["checkpoint"]).parent.parent.name for r in scored} == {
            f"lr{again['best_lr'][norm]:g}-seed{s}" for s in (0, 1)}
        assert again["held_out"][norm]["loss_mean"] == pytest.approx(np.mean([r["loss"] for r in scored]))
        accs = [r["cmp_mc"]["acc"] for r in again["downstream"][norm]["runs"]]
        assert len(accs) == 2
        assert again["downstream"][norm]["mean"]["cmp_mc"]["acc"] == pytest.approx(np.mean(accs))
    # other settings over the same folder are refused, naming the difference
    args = sweep_args(corpus, out, 2)
    args[args.index("--max-steps") + 1] = "5"
    assert compare.main(args) == 2
    assert "max_steps: 3 there, 5 now" in capsys.readouterr().err
