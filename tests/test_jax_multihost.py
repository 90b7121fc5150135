"""Two JAX processes joined by `jax.distributed` (CPU, gloo collectives): each loads only its rows
of every batch, only process 0 prints and writes TensorBoard, orbax writes one checkpoint, and the
run computes what one process with the same devices computes."""

import os
import re
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _val_loss(stdout: str) -> float:
    line = r"final val loss ([0-9.]+) nats/token \([0-9.]+ bits/byte\) after 2 steps"
    return float(re.search(line, stdout).group(1))


def test_two_hosts_match_one_process(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # XLA backend (LLVM) optimization level 0 cuts the three processes' compile time; both sides of
    # the comparison are built alike.
    fast = "--xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {fast}",
           "JAX_PLATFORMS": "cpu"}
    flags = [sys.executable, "-m", "experiments.pretrain", "--preset", "cpu-tiny", "--arch",
             "decoder_only", "--max-steps", "2", "--eval-every", "2", "--set", "eval_batches=1",
             "--set", "sample_tokens=2", "--batch-size", "4", "--seq-len", "16"]
    port = _free_port()
    hosts = [subprocess.Popen([*flags, "--out", str(tmp_path / "hosts"), "--coordinator",
                               f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [h.communicate(timeout=400) for h in hosts]
    for h, (_, err) in zip(hosts, outs, strict=True):
        assert h.returncode == 0, err[-3000:]
    assert "TnT pretrain" in outs[0][0] and "final val loss" in outs[0][0]
    # process 1 prints nothing of its own (gloo's C++ connection notices aside)
    assert "TnT pretrain" not in outs[1][0] and "val loss" not in outs[1][0]
    assert len(list((tmp_path / "hosts" / "tb").iterdir())) == 1
    assert [p.name for p in (tmp_path / "hosts" / "checkpoints").iterdir()] == ["2"]
    from tnt_jax.checkpoint import load_checkpoint
    from tnt_torch.checkpoint import load_checkpoint as load_in_torch

    for load in (load_checkpoint, load_in_torch):  # the multi-host orbax checkpoint reads anywhere
        assert load(tmp_path / "hosts")[1].model.d_model == 64
    one = subprocess.run([*flags, "--out", str(tmp_path / "one")], cwd=root, capture_output=True,
                         text=True, timeout=400, env={
                             **env, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {fast}"})
    assert one.returncode == 0, one.stderr[-3000:]
    # printed with 4 decimals; the runs differ by fp32 summation order only
    assert abs(_val_loss(outs[0][0]) - _val_loss(one.stdout)) <= 2e-4
