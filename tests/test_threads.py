"""`--threads N`: the environment that holds torch, XLA and BLAS to N threads, and torch
following it."""

import subprocess
import sys

import pytest

from experiments.pretrain import main
from tnt.threads import XLA_ONE_THREAD, limit_threads


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
