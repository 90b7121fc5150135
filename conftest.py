"""Session-wide settings for tests/ and parity_tests/: one JAX compilation cache per test session.

Most of the suite's time is XLA compiling the same tiny models again: every backend, CLI run and
subprocess traces its own train step. A persistent compilation cache in a fresh folder, shared by
the pytest-xdist workers and the subprocesses they start (through the environment), compiles each
distinct program once per session; a cached executable is the compiled program itself, so every
result is the same. The folder is the session's own (nothing carries over between sessions) and
is removed at its end. A cache size makes JAX lock the folder around each read and write, so a
process never reads an entry another one is still writing; each write then scans the folder, so
only programs that take 0.1 s or more to compile (models and steps, not single eager operations,
which each process caches in memory) are written.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
SETTINGS = {  # JAX reads these from the environment in a subprocess; the same values in-process
    "jax_persistent_cache_min_compile_time_secs": 0.1,
    "jax_persistent_cache_min_entry_size_bytes": -1,
    "jax_compilation_cache_max_size": 1 << 34,
}
_OWNED = pytest.StashKey[str]()


def pytest_configure(config):
    if CACHE_ENV not in os.environ:  # the main process (workers inherit its folder)
        config.stash[_OWNED] = os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="tnt-jax-cache-")
    for name, value in SETTINGS.items():
        os.environ.setdefault(name.upper(), str(value))
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    for name, value in SETTINGS.items():
        jax.config.update(name, type(value)(os.environ.get(name.upper(), value)))


def pytest_unconfigure(config):
    owned = config.stash.get(_OWNED, None)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)
