"""Data parallelism through jax.sharding: a step on a 2-device mesh equals the 1-device step."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    from tnt.config import build_run_config
    from tnt.data import BatchSpec
    from tnt_jax.train import JaxBackend

    cfg = build_run_config("cpu-tiny", sets=["seq_len=8", "batch_size=4"])
    spec = BatchSpec(cfg.model.arch, 4, 8, 8, cfg.model.bos_id)
    windows = np.random.default_rng(0).integers(3, 259, (4, spec.window))
    out = {"devices": jax.device_count()}
    for name, devices in (("one", jax.devices()[:1]), ("all", jax.devices())):
        backend = JaxBackend(cfg, Mesh(np.array(devices), ("data",)))
        for _ in range(2):
            m = backend.step(spec.make(windows))
        out[name] = {"loss": float(m["loss"]),
                     "params": {k: v.tolist() for k, v in backend.arrays(
                         ["decoder.layers.0.attn.wq", "s_z"]).items()},
                     "shards": len(backend.state.params["s_z"].sharding.device_set)}
    json.dump(out, sys.stdout)
""")


def test_data_parallel_step_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["devices"] == 2 and out["all"]["shards"] == 2 and out["one"]["shards"] == 1
    assert abs(out["one"]["loss"] - out["all"]["loss"]) < 1e-5
    import numpy as np

    for name, value in out["one"]["params"].items():
        np.testing.assert_allclose(out["all"]["params"][name], value, atol=2e-6, err_msg=name)
