"""tnt/malloc.py: after `import tnt_jax` a freed large block is reused without new page faults;
with `TNT_MALLOC=system` glibc maps a fresh one (every page faults again)."""

import os
import subprocess
import sys

import pytest

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MB): mmapped by default
PAGES = BLOCK // 4096

PROBE = f"""
import ctypes, resource, tnt_jax
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def cycle():
    p = libc.malloc({BLOCK})
    ctypes.memset(p, 1, {BLOCK})  # touch every page
    libc.free(p)

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TNT_MALLOC"}
    if env_value is not None:
        env["TNT_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_a_freed_block_is_reused_without_page_faults():
    tuned, system = faults(None), faults("system")
    assert system >= PAGES // 2, f"glibc's default should map the block afresh: {system} faults"
    assert tuned < PAGES // 16, f"the freed block should be reused: {tuned} faults for {PAGES} pages"
