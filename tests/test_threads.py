"""`--threads N`: the environment that holds torch, XLA and BLAS to N threads, and torch
following it."""

import subprocess
import sys

import pytest

from experiments import bench, evaluate, flags, generate, pretrain
from experiments.pretrain import main
from tnt.threads import XLA_ONE_THREAD, limit_threads

# each command with --threads, and input it refuses after applying the flag (no work is done)
COMMANDS = {"pretrain": (pretrain.main, ["--out", "{tmp}/run", "--max-steps", "0"]),
            "generate": (generate.main, ["--ckpt", "{tmp}/missing", "--prompt", "x"]),
            "evaluate": (evaluate.main, ["{tmp}/missing", "--data", "{tmp}/missing"]),
            "bench": (bench.main, ["train", "--steps", "0"])}


def test_limit_threads_sets_every_pool_and_xla_only_for_one_thread(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    limit_threads(3, env)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "3"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    limit_threads(1, env)
    limit_threads(1, env)  # added once
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {XLA_ONE_THREAD}"
    with pytest.raises(ValueError, match="--threads must be a positive integer, got 0"):
        limit_threads(0, env)


def test_torch_trainer_takes_its_threads_from_the_limit():
    code = ("import torch; from tnt.threads import limit_threads; limit_threads(1); "
            "from tnt_torch.train import configure_threads; torch.set_num_threads(2); "
            "configure_threads(); print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_a_bad_thread_count_is_one_error_line(tmp_path, capsys):
    assert main(["--threads", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --threads must be a positive integer, got 0\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_threads_through_the_one_helper(command, tmp_path, monkeypatch, capsys):
    """A bad count is the same one error line in every command; a good one reaches
    `limit_threads` before the command looks at its other input."""
    run, argv = COMMANDS[command]
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert run([*argv, "--threads", "0"]) == 2
    assert capsys.readouterr().err == "error: --threads must be a positive integer, got 0\n"
    seen = []
    monkeypatch.setattr(flags, "limit_threads", seen.append)
    assert run([*argv, "--threads", "3"]) == 2  # refused for its other input, after the threads
    assert seen == [3]
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "run").exists()
