"""A pretrain run killed with SIGKILL at any instant loses nothing: the run is killed
inside its first save and again inside a later one, `--resume` then ends bit-identical to an
uninterrupted run with every TensorBoard step logged once, and a fresh start in a folder that
holds only a partial save works. The kills are real SIGKILLs at exact points, through the
`TNT_TEST_KILL` test hook (`tnt.checkpoint_meta.kill_point`)."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.pretrain import main
from tnt.checkpoint_io import committed, read_canonical, stale_temp_folders
from tnt.checkpoint_meta import KILL_ENV, SIGNAL_ENV

ROOT = Path(__file__).resolve().parents[1]


def args(backend, corpus, out, *extra):
    return ["--backend", backend, "--preset", "cpu-tiny", "--data", corpus, "--out", str(out),
            "--max-steps", "6", "--eval-every", "3", "--ckpt-every", "3", "--seq-len", "16",
            "--set", "eval_batches=2", "--set", "log_every=1", "--set", "sample_tokens=4",
            "--set", "decay_steps=6", "--set", "analysis_every=0", *extra]


def _default_sigint() -> None:
    """A background job (CI started by a script) inherits SIGINT ignored, and the run keeps an
    ignored signal ignored; the child gets the default disposition, as a terminal's job has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def killed_run(kill_at, *argv, sig="SIGKILL"):
    """`python -m experiments.pretrain ARGV` in a subprocess that sends itself `sig` at `kill_at`."""
    env = {**os.environ, KILL_ENV: kill_at, SIGNAL_ENV: sig, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "experiments.pretrain", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=_default_sigint)
    if sig == "SIGKILL":
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return done


def params_of(run_dir):
    """Canonical params through the framework-free reader (either backend's layout)."""
    return read_canonical(run_dir)[0]


def scalars(run_dir, tag):
    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_kills_anywhere_then_resume_equal_an_uninterrupted_run(backend, corpus, tmp_path):
    assert main(args(backend, corpus, tmp_path / "full")) == 0
    cut = tmp_path / "cut"
    killed_run("save:3", *args(backend, corpus, cut))  # inside the first save, before its commit
    assert committed(cut / "checkpoints") == []
    if backend == "torch":  # synchronous save: its temp folder is certainly there
        assert stale_temp_folders(cut / "checkpoints")
    if backend == "torch":  # the loop's start-up is shared; its temp folder is deterministic
        partial = tmp_path / "partial"
        shutil.copytree(cut, partial)

    killed_run("save:6", *args(backend, corpus, cut, "--resume"))  # steps 4-6 logged, 6 unsaved
    assert [p.name for p, _ in committed(cut)] == ["3"]
    assert main(args(backend, corpus, cut, "--resume")) == 0
    assert main(args(backend, corpus, cut, "--resume")) == 0  # a finished run: logs nothing new
    assert stale_temp_folders(cut / "checkpoints") == []
    full, resumed = params_of(tmp_path / "full"), params_of(cut)
    for name in full:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)
    for tag in ("train/loss", "train/grad_norm", "val/loss", "val/final_loss"):  # each step once
        assert scalars(cut, tag) == scalars(tmp_path / "full", tag), tag

    if backend == "torch":  # a fresh start (no --resume) in a folder holding only a partial save
        assert main(args(backend, corpus, partial, "--max-steps", "3")) == 0
        assert stale_temp_folders(partial / "checkpoints") == []
        assert [p.name for p, _ in committed(partial)] == ["3"]


def test_a_session_opened_in_the_same_second_still_supersedes_the_earlier_one(tmp_path):
    """TensorBoard reads event files in name order, a name starts with the second it was opened,
    and a pid suffix breaks ties: an earlier session with a larger pid, opened in the same second,
    would be read last and its purge would erase the later session's steps (a CI flake of the
    test above)."""
    from tensorboardX import SummaryWriter

    from tnt.run import event_writer

    tb = tmp_path / "tb"
    earlier = SummaryWriter(str(tb), filename_suffix=".99999999")  # sorts after any real pid
    for step in (1, 2, 3):
        earlier.add_scalar("train/loss", 10.0 + step, step)
    earlier.close()
    later = event_writer(tb, start=1)  # resumes after step 1: supersedes steps 2 and 3
    for step in (2, 3):
        later.add_scalar("train/loss", float(step), step)
    later.close()
    files = sorted(p.name for p in tb.iterdir())
    assert files[-1].endswith(f".{os.getpid()}"), files
    assert scalars(tmp_path, "train/loss") == [(1, 11.0), (2, 2.0), (3, 3.0)]


def test_a_kill_while_pruning_leaves_nothing_a_start_does_not_remove(corpus, tmp_path, capsys):
    """Pruning renames a step aside before deleting it, so a kill leaves the committed step or a
    listed leftover; a start removes every leftover, also a numbered folder that is not a step
    (what a writer deleting file by file leaves)."""
    run = tmp_path / "run"
    killed_run("prune:3", *args("torch", corpus, run, "--set", "keep_checkpoints=1"))
    assert [p.name for p, _ in committed(run)] == ["6"]
    partial = run / "checkpoints" / "2"
    partial.mkdir()
    (partial / "meta.json").write_text("{}")
    assert [p.name for p in stale_temp_folders(run / "checkpoints")] == [".tmp-pruned", "2"]
    assert main(args("torch", corpus, run, "--resume", "--max-steps", "9",
                     "--set", "keep_checkpoints=1")) == 0
    assert "left by an interrupted save or prune" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["9"]


def test_jax_pruning_goes_through_the_pruned_folder(tmp_path):
    """orbax deletes a step file by file; it renames it into `PRUNED` first, which `wait` empties;
    a symlinked step loses its link only (orbax's own delete cannot remove a link)."""
    import jax.numpy as jnp

    from tnt_jax import checkpoint

    run, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    manager = checkpoint.open_manager(run, keep=1)
    checkpoint.save(manager, 1, {"w": jnp.zeros(2)}, {"step": 1})
    checkpoint.wait(manager)
    (run / "1").rename(elsewhere)  # a step folder linked in from another disk
    (run / "1").symlink_to(elsewhere)
    manager = checkpoint.open_manager(run, keep=1)
    for step in (2, 3, 4):
        checkpoint.save(manager, step, {"w": jnp.full((2,), float(step))}, {"step": step})
    checkpoint.wait(manager)
    assert sorted(p.name for p in run.iterdir()) == ["4"]
    assert (elsewhere / "state").is_dir()  # only the link was pruned


@pytest.mark.parametrize("backend, sig, code", [("torch", "SIGINT", 130), ("jax", "SIGTERM", 143)])
def test_ctrl_c_and_sigterm_say_the_step_to_resume_from(backend, sig, code, corpus, tmp_path):
    """The signal arrives inside the save of step 6: torch has not committed it (its temp folder
    is removed by the next start), jax lets orbax's write in flight commit on the way out."""
    run = tmp_path / "run"
    done = killed_run("save:6", *args(backend, corpus, run, "--max-steps", "9"), sig=sig)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == code and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    step = committed(run)[0][0].name
    assert step == ("3" if backend == "torch" else "6")
    assert errors[0] == (f"error: stopped by {sig}{' (Ctrl-C)' if sig == 'SIGINT' else ''}; the last "
                         f"checkpoint is step {step} in {run / 'checkpoints'}: continue with --resume "
                         f"--out {run}")
    assert main(args(backend, corpus, run, "--resume", "--max-steps", "9")) == 0
    assert [p.name for p, _ in committed(run)][0] == "9"


def test_events_flushed_before_a_kill_are_all_on_disk(tmp_path):
    """tensorboardX's flush() leaves events queued for its writer thread; tnt.events writes them
    in the caller's thread, so after flush() a SIGKILL loses none."""
    code = ("import os, signal, sys\nfrom tnt.events import EventWriter\n"
            "w = EventWriter(sys.argv[1])\n"
            "for i in range(1, 501):\n    w.add_scalar('train/loss', float(i), i)\n"
            "w.flush()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tb")], env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert scalars(tmp_path, "train/loss") == [(i, float(i)) for i in range(1, 501)]
