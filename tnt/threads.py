"""How many CPU threads a run's framework may use: `--threads N` holds it to N cores' worth, so
that a job sharing a busy machine does not oversubscribe its cores (a thread pool as large as the
machine, next to other jobs, makes every step wait on descheduled threads).

Applied through the environment before the framework starts its thread pools: `OMP_NUM_THREADS`
(read by torch's `configure_threads` and by OpenMP/BLAS libraries) and, for one thread, XLA's
`--xla_cpu_multi_thread_eigen=false` (XLA:CPU has no flag for another count), added only while
JAX is not yet imported, as XLA reads its flags once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_threads(n: int, environ: MutableMapping[str, str] | None = None) -> None:
    """Hold the frameworks to `n` threads (see the module docstring); raises ValueError for n < 1."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be a positive integer, got {n!r}")
    env = os.environ if environ is None else environ
    for name in THREAD_VARIABLES:
        env[name] = str(n)
    flags = env.get("XLA_FLAGS", "")
    if n == 1 and "jax" not in sys.modules and XLA_ONE_THREAD not in flags:
        env["XLA_FLAGS"] = f"{flags} {XLA_ONE_THREAD}".strip()
