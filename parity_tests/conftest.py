"""Parity between tnt_jax and tnt_torch: devices, tolerances, and the report of differences.

Every case records the largest differences it saw through the `report` fixture; they are printed
as a table at the end of `pytest parity_tests` (whether the case passed or failed).

Devices: the CPU always; a GPU when both frameworks see one (otherwise the GPU cases are skipped
and the reason is printed). Tolerances: float32 on the CPU, 1e-5 on logits (both frameworks
accumulate the same fp32 products in different orders; the observed gap is ~1e-6). On a GPU,
XLA's default matmul precision for float32 uses reduced-precision passes (TF32/bf16-class) while
torch keeps full fp32 by default, so the GPU tolerance is bf16-level: 2e-2 absolute on logits of
magnitude O(1-10) (bf16 has 8 mantissa bits, a relative step of 2^-8 = 4e-3). JAX runs with
`jax_numpy_rank_promotion="raise"` (silent broadcasts are errors).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")  # as in tests/conftest.py

RESULTS: list[tuple[str, str, float]] = []
CPU_TOL = {"logits": 1e-5, "params": 1e-5, "sphere": 1e-6, "loss": 1e-5}
GPU_TOL = {"logits": 2e-2, "params": 2e-2, "sphere": 1e-5, "loss": 2e-2}


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
    return request.param


@pytest.fixture
def tol(device):
    return CPU_TOL if device == "cpu" else GPU_TOL


@pytest.fixture
def report(request):
    """`report(what, a, b)` records and returns max |a - b|."""

    def record(what: str, a, b) -> float:
        diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        RESULTS.append((request.node.name, what, diff))
        return diff

    return record


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("parity: largest absolute differences per case")
    width = max(len(case) for case, _, _ in RESULTS)
    for case, what, diff in RESULTS:
        terminalreporter.write_line(f"{case:<{width}}  {what:<28} {diff:.3e}")


def pytest_report_header(config):
    return f"parity devices: cpu{'' if gpu_reason() else ', gpu'} ({gpu_reason() or 'gpu found'})"


