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
from tnt.checkpoint_meta import KILL_ENV

ROOT = Path(__file__).resolve().parents[1]


def args(backend, corpus, out, *extra):
    return ["--backend", backend, "--preset", "cpu-tiny", "--data", corpus, "--out", str(out),
            "--max-steps", "6", "--eval-every", "3", "--ckpt-every", "3", "--seq-len", "16",
            "--set", "eval_batches=2", "--set", "log_every=1", "--set", "sample_tokens=4",
            "--set", "decay_steps=6", "--set", "analysis_every=0", *extra]


def killed_run(kill_at, *argv):
    """`python -m experiments.pretrain ARGV` in a subprocess that SIGKILLs itself at `kill_at`."""
    env = {**os.environ, KILL_ENV: kill_at, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "experiments.pretrain", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


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
    assert stale_temp_folders(cut / "checkpoints") == []
    full, resumed = params_of(tmp_path / "full"), params_of(cut)
    for name in full:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)
    for tag in ("train/loss", "train/grad_norm", "val/loss"):  # each step once, the same values
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
