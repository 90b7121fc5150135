"""Parity between tnt_jax and tnt_torch: devices, tolerances, and the report of differences.

Every case records the largest differences it saw through the `report` fixture; they are printed
as a table at the end of `pytest parity_tests` (whether the case passed or failed).

Devices: the CPU always; a GPU when both frameworks see one (otherwise the GPU cases are skipped
and the reason is printed; `python -m experiments.doctor` says why a framework sees no GPU).
Tolerances: float32 is held to 1e-5 on logits on every device (both frameworks accumulate the
same fp32 products in different orders; the observed gap is ~1e-6 on the CPU). That needs
full-precision matmuls on a GPU: XLA's default fp32 matmul precision there uses reduced-precision
passes (TF32/bf16-class, ~2e-2 on these logits) and torch may allow TF32, so every parity case
runs under `jax.default_matmul_precision("highest")` with torch's TF32 switched off
(`full_precision_matmuls`). JAX runs with `jax_numpy_rank_promotion="raise"` (silent broadcasts
are errors). bfloat16 compute is compared across the frameworks in
tests/test_compute_dtype_attention_remat.py, with the tolerance derived in docs/design.md
("Compute dtype").
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from experiments.parity import full_precision_matmuls

# pytest-xdist runs several test processes (pyproject.toml): on a GPU each takes memory as it needs
# it instead of JAX's default 75% of the device, which would leave the next process none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax.config.update("jax_numpy_rank_promotion", "raise")  # as in tests/conftest.py

RESULTS: list[tuple[str, str, float]] = []
CPU_TOL = {"logits": 1e-5, "params": 1e-5, "sphere": 1e-6, "loss": 1e-5}
GPU_TOL = dict(CPU_TOL)  # with full-precision matmuls a GPU is held to the CPU's fp32 tolerances


def gpu_reason() -> str | None:
    """None when both frameworks see a GPU, else why the GPU cases are skipped."""
    import jax
    import torch

    try:
        jax_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        jax_gpu = False
    if not jax_gpu:
        return "no GPU visible to JAX"
    if not torch.cuda.is_available():
        return "no GPU visible to torch"
    return None


DEVICES = ["cpu", "gpu"]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "gpu":
        reason = gpu_reason()
        if reason:
            pytest.skip(reason)
    with full_precision_matmuls():
        yield request.param


@pytest.fixture
def tol(device):
    return CPU_TOL if device == "cpu" else GPU_TOL


@pytest.fixture
def report(request):
    """`report(what, a, b)` records and returns max |a - b|, as a user property of the test: its
    report carries it to the process that prints the table (the main one under pytest-xdist)."""

    def record(what: str, a, b) -> float:
        diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        request.node.user_properties.append(("parity", (what, diff)))
        return diff

    return record


def pytest_runtest_logreport(report):
    if report.when == "call":
        case = report.nodeid.split("::")[-1]
        RESULTS.extend((case, *value) for key, value in report.user_properties if key == "parity")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("parity: largest absolute differences per case")
    width = max(len(case) for case, _, _ in RESULTS)
    for case, what, diff in RESULTS:
        terminalreporter.write_line(f"{case:<{width}}  {what:<28} {diff:.3e}")


def pytest_report_header(config):
    return f"parity devices: cpu{'' if gpu_reason() else ', gpu'} ({gpu_reason() or 'gpu found'})"


