"""What goes wrong in a pretrain run is said in one `error:` line: bad input exits 2
and leaves an existing run folder byte for byte; a diverging run exits 3 and never saves a
non-finite checkpoint; a second run on a folder in use is refused naming the holder; an
unreadable newest checkpoint falls back to the one before it."""

import math
import os
import shutil
import socket

import numpy as np
import pytest
from safetensors import SafetensorError

from experiments import prepare
from experiments.evaluate import evaluate
from experiments.pretrain import main
from tnt.checkpoint_io import CheckpointFallback, committed, read_canonical
from tnt.config import build_run_config
from tnt.run import diverged_message, over_ceiling
from tnt.run_lock import RunLock

BACKENDS = ["jax", "torch"]


def args(backend, corpus, out, *extra):
    return ["--backend", backend, "--preset", "cpu-tiny", "--data", corpus, "--out", str(out),
            "--max-steps", "3", "--eval-every", "3", "--ckpt-every", "3", "--seq-len", "16",
            "--set", "eval_batches=1", "--set", "log_every=1", "--set", "sample_tokens=2",
            "--set", "analysis_every=0", *extra]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One finished 3-step run per backend, which the refusals below must leave untouched."""
    root = tmp_path_factory.mktemp("runs")
    for backend in BACKENDS:
        assert main(args(backend, corpus, root / backend)) == 0
    return root


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# (extra flags, what the message must contain); `{file}` is an existing plain file.
BAD_INPUTS = [
    (["--resume", "--lr", "nan"], "lr must be a finite number, got nan"),
    (["--resume", "--set", "lr=inf"], "lr must be a finite number, got inf"),
    (["--resume", "--set", "min_lr=nan"], "min_lr must be a finite number"),
    (["--resume", "--set", "grad_clip=nan"], "grad_clip must be a finite number"),
    (["--resume", "--seed", "-1"], "seed must be >= 0, got -1"),
    (["--resume", "--seed", "99999999999999999999"], "seed must be at most 2**63 - 1"),
    (["--resume", "--set", "eps=0"], "eps must be > 0"),
    (["--resume", "--set", "max_loss=-1"], "max_loss must be >= 0"),
    (["--resume", "--tokenizer", "bpe", "--set", "bpe_vocab_size=100"],
     "bpe_vocab_size must be at least 259"),
    (["--resume", "--set", "d_model=32"], "d_model: 32 != 64"),
    (["--resume", "--set", "lr=nan"], "lr must be a finite number"),
    ([], "already holds checkpoints"),
    (["--resume", "--set", "nope=1"], "unknown config field 'nope'"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_changes_nothing(backend, extra, message, runs, corpus,
                                                         capsys):
    before = snapshot(runs / backend)
    assert main(args(backend, corpus, runs / backend, *extra)) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert snapshot(runs / backend) == before


def test_bad_output_paths_are_named(corpus, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    assert main(args("torch", corpus, file)) == 2
    assert f"--out {file} is a file" in one_error_line(capsys.readouterr().err)
    assert main(args("torch", corpus, file / "sub")) == 2
    assert f"cannot create run directory --out {file / 'sub'}" in one_error_line(
        capsys.readouterr().err)
    assert file.read_text() == "not a folder"
    assert main(args("torch", corpus, "")) == 2
    assert "--out is empty" in one_error_line(capsys.readouterr().err)
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize("out, extra, message", [
    ("{file}", [], "--out {file} is a file"),
    ("{file}/sub", [], "cannot write the token folder --out {file}/sub"),
    ("/proc/tnt-tokens", [], "cannot write the token folder --out /proc/tnt-tokens"),
    ("", [], "--out is empty"),
    ("{run}", [], "--out {run} is a pretrain run folder"),
    ("{tmp}/tokens", ["--val-percent", "nan"], "--val-percent must be in (0, 100), got nan"),
])
def test_prepare_refuses_before_any_work(out, extra, message, runs, corpus, tmp_path, capsys):
    """One line, no progress bar (nothing was tokenized), nothing written."""
    file = tmp_path / "file"
    file.write_text("kept")
    names = {"file": file, "run": runs / "torch", "tmp": tmp_path}
    before = snapshot(runs / "torch")
    assert prepare.main(["--data", corpus, "--out", out.format(**names), *extra]) == 2
    err = capsys.readouterr().err
    assert message.format(**names) in one_error_line(err) and err.count("\n") == 1, err
    assert snapshot(runs / "torch") == before and file.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_run_on_a_folder_in_use_is_refused(backend, runs, corpus, capsys):
    """flock conflicts between two open descriptions even in one process, so holding the lock
    here is exactly what a live first run does."""
    before = snapshot(runs / backend)
    with RunLock(runs / backend):
        held = snapshot(runs / backend)
        assert main(args(backend, corpus, runs / backend, "--resume", "--max-steps", "6")) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in line and "in use" in line
        assert snapshot(runs / backend) == held
    assert {p: b for p, b in before.items() if p.name != ".lock"} == {
        p: b for p, b in snapshot(runs / backend).items() if p.name != ".lock"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_stops_with_the_last_good_checkpoint(backend, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(args(backend, corpus, out, "--norm", "rmsnorm", "--lr", "1e3", "--max-steps", "30",
                     "--ckpt-every", "1", "--set", "warmup_steps=0", "--set", "keep_checkpoints=2",
                     "--set", "analysis_every=1"))  # the dynamics' SVDs never see a NaN
    assert code == 3
    line = one_error_line(capsys.readouterr().err)
    assert "training diverged at step" in line and "last good checkpoint is step" in line
    steps = [int(p.name) for p, _ in committed(out)]
    assert steps and f"last good checkpoint is step {steps[0]} " in line
    for step_dir, _ in committed(out):
        params, _ = read_canonical(step_dir)
        assert all(np.isfinite(a).all() for a in params.values()), step_dir


def test_a_loss_above_max_loss_stops_the_run(corpus, tmp_path, capsys):
    """The ceiling is the shared loop's (one backend suffices)."""
    assert main(args("torch", corpus, tmp_path / "run", "--set", "max_loss=1")) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "exceeds max_loss=1" in line and "no checkpoint was written" in line
    # the weights were finite: the message says what was not saved, not "nothing non-finite"
    assert "weights (finite, but past the loss ceiling) were not saved" in line
    assert "non-finite" not in line
    assert not (tmp_path / "run" / "checkpoints").exists() or committed(tmp_path / "run") == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(backend, runs, corpus,
                                                                     tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / backend, run)
    assert main(args(backend, corpus, run, "--resume", "--max-steps", "6", "--ckpt-every", "3",
                     "--set", "eval_every=6")) == 0
    newest = run / "checkpoints" / "6"
    for f in newest.rglob("*"):  # truncate every data file of the newest step
        if f.is_file() and not f.name.startswith("meta"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(CheckpointFallback, match=f"{newest}.*previous checkpoint .*3"):
        _, meta = read_canonical(run)
    assert meta["step"] == 3
    with pytest.warns(CheckpointFallback):  # held-out evaluation falls back alike
        assert evaluate(run, corpus, batches=1)["step"] == 3
    with pytest.warns(CheckpointFallback):
        assert main(args(backend, corpus, run, "--resume", "--max-steps", "6")) == 0
    assert "moved the unreadable checkpoint" in capsys.readouterr().out
    assert (run / "checkpoints" / "corrupt-6").is_dir()
    assert [p.name for p, _ in committed(run)] == ["6", "3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_only_checkpoint_is_refused_in_one_line(backend, runs, corpus, tmp_path, capsys):
    """orbax's errors carry the whole TensorStore spec; the message keeps its first line."""
    run = tmp_path / "run"
    shutil.copytree(runs / backend, run)
    for f in (run / "checkpoints" / "3").rglob("*"):
        if f.is_file() and not f.name.startswith("meta"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = snapshot(run)
    assert main(args(backend, corpus, run, "--resume", "--max-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "checkpoints/3 is corrupt" in one_error_line(err) and err.count("\n") == 1, err
    assert snapshot(run) == before


def test_resume_without_checkpoints_folder_is_refused_and_writes_nothing(runs, corpus, tmp_path,
                                                                         capsys):
    """A run makes `checkpoints/` as it starts, so a missing one was deleted: restarting at step
    0 would silently supersede the run's TensorBoard steps. An empty folder gets no `.lock`."""
    run = tmp_path / "run"
    shutil.copytree(runs / "torch", run)
    shutil.rmtree(run / "checkpoints")
    (run / ".lock").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (run, empty):
        before = snapshot(folder)
        assert main(args("torch", corpus, folder, "--resume", "--max-steps", "6")) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{folder / 'checkpoints'} is missing" in line and "without --resume" in line
        assert snapshot(folder) == before and not (folder / ".lock").exists()


def test_the_default_ceiling_is_twice_the_loss_of_a_uniform_prediction():
    """An initialized model starts near ln V and a learning one goes below it; a loss of twice
    that is divergence (JAX nGPT at --lr 1e3 ended at 14,207 with exit 0 without a ceiling)."""
    cfg = build_run_config("cpu-tiny", {"vocab_size": 259}, [])
    ceiling = 2 * math.log(259)
    assert cfg.train.max_loss is None and cfg.loss_ceiling == pytest.approx(ceiling, rel=1e-12)
    assert over_ceiling({"loss": ceiling * 0.99, "grad_norm": 1.0}, cfg) is None
    assert over_ceiling({"loss": 11.2, "grad_norm": 1.0}, cfg) == (
        "train loss 11.2 exceeds the divergence ceiling 11.11 (twice ln(259), the loss of a "
        "uniform prediction; --set max_loss=X sets another, 0 none)")
    off = build_run_config("cpu-tiny", {"vocab_size": 259}, ["max_loss=0"])
    assert over_ceiling({"loss": 1e6, "grad_norm": 1.0}, off) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(backend, corpus, tmp_path,
                                                                    monkeypatch, capsys):
    """The save of step 6 fails as a full disk fails it (safetensors' and orbax's own errors)."""
    if backend == "torch":
        import tnt_torch.checkpoint as ckpt

        real, target = ckpt.save_file, "save_file"

        def failing(tensors, path, metadata=None):
            if "/.tmp-6-" in path:
                raise SafetensorError("Error while serializing: I/O error: No space left on device")
            return real(tensors, path, metadata=metadata)
    else:
        import orbax.checkpoint as ckpt

        ckpt, real, target = ckpt.CheckpointManager, ckpt.CheckpointManager.save, "save"

        def failing(manager, step, *a, **k):
            if step == 6:
                raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device [28]")
            return real(manager, step, *a, **k)
    run = tmp_path / "run"
    monkeypatch.setattr(ckpt, target, failing)
    assert main(args(backend, corpus, run, "--max-steps", "6", "--set", "eval_every=6")) == 4
    line = one_error_line(capsys.readouterr().err)
    assert "cannot write" in line and "No space left on device" in line and "intact" in line
    assert [p.name for p, _ in committed(run)] == ["3"]
    monkeypatch.undo()
    assert main(args(backend, corpus, run, "--resume", "--max-steps", "6")) == 0
    assert [p.name for p, _ in committed(run)] == ["6", "3"]


def test_the_stop_message_says_what_was_not_saved(tmp_path):
    """A finite loss past the ceiling and a non-finite value are told apart, each with where to
    continue from."""
    ceiling = diverged_message(7, "train loss 12 exceeds max_loss=10", True, 5, tmp_path)
    assert ceiling == (f"training diverged at step 7: train loss 12 exceeds max_loss=10; step 7's "
                       f"weights (finite, but past the loss ceiling) were not saved, the last good "
                       f"checkpoint is step 5 in {tmp_path}; continue from it with --resume and "
                       f"e.g. a lower --lr")
    nan = diverged_message(3, "train loss nan, gradient norm nan", False, None, tmp_path)
    assert nan == ("training diverged at step 3: train loss nan, gradient norm nan; nothing "
                   "non-finite was saved, no checkpoint was written; start again with a lower --lr")
