"""tnt_jax.attention: masks in the forms the fused kernels know (`is_causal`, sequence lengths,
the dense rest) give the dense mask's values and gradients; the cuDNN selection rules; the bf16
train step exported for CUDA from this CPU (remat, a sharded mesh of forced CPU devices)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tnt_jax import attention
from tnt_jax.attention import Mask, attend, cudnn_refusal

B, L, H, K = 3, 6, 2, 8
VALID = {  # key padding per row: none, a suffix (row 2 all pad), and pad in the middle
    "none": np.ones((B, L), bool),
    "suffix": np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [0] * 6], bool),
    "middle": np.array([[1] * 6, [1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]], bool),
}


def masks(valid: np.ndarray) -> list[tuple[Mask, np.ndarray]]:
    """(structured mask, the same mask dense [B, L, S]) for every form the model builds."""
    causal = np.tril(np.ones((L, L), bool))[None]
    keep = np.random.default_rng(1).random((B, L, L)) < 0.6
    v = jnp.asarray(valid)
    return [(Mask(causal=True), np.broadcast_to(causal, (B, L, L))),
            (Mask(key_valid_BxS=v, causal=True), causal & valid[:, None, :]),
            (Mask(key_valid_BxS=v), np.broadcast_to(valid[:, None, :], (B, L, L))),
            (Mask(keep_BxLxS=jnp.asarray(keep)), keep)]


def out_and_grads(f, q, k, v, g):
    y, vjp = jax.vjp(f, q, k, v)
    return (y, *vjp(g))


@pytest.mark.parametrize("padding", list(VALID))
def test_structured_masks_equal_the_dense_mask_in_every_kernel(padding, rng):
    """The einsum path with a `Mask` is the dense path bit for bit (the same array reaches the
    same ops); the XLA kernel with `is_causal` / sequence lengths matches it within fp32
    reordering: 16 unit roundoffs per unit of the largest score, times each array's magnitude
    (a wrong mask or scale moves these O(1) values by O(1))."""
    q, k, v, g = (jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(4))
    scale = math.sqrt(K)
    score = float(jnp.max(jnp.abs(jnp.einsum("blhk,bshk->bhls", q * scale, k))))
    forms = masks(VALID[padding])

    @jax.jit  # one compile for every form and kernel
    def run(q, k, v, g):
        return [{impl: out_and_grads(lambda q, k, v, m=m, i=impl: attend(q, k, v, m, scale, i),
                                     q, k, v, g) for impl in ("einsum", "xla")}
                | {"dense": out_and_grads(lambda q, k, v, d=d: attend(q, k, v, d, scale, "einsum"),
                                          q, k, v, g)}
                for m, d in ((m, jnp.asarray(d)) for m, d in forms)]

    for (_, dense), got in zip(forms, run(q, k, v, g), strict=True):
        ref = got["dense"]
        for a, b in zip(ref, got["einsum"], strict=True):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        for impl in ("xla",):
            assert np.all(np.asarray(got[impl][0])[~dense.any(-1)] == 0.0)  # no key: exactly 0
            for a, b in zip(ref, got[impl], strict=True):
                atol = 16 * 2.0**-24 * score * float(np.abs(np.asarray(a)).max())
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=atol)


def test_fused_kernel_gets_causality_and_lengths_not_a_dense_mask(monkeypatch, rng):
    """Causal self-attention over padding-free or right-padded rows reaches
    `jax.nn.dot_product_attention` as `is_causal=True` and `key_value_seq_lengths`; the dense
    mask is only the branch for padding that is not a suffix."""
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q = jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32)
    attend(q, q, q, Mask(causal=True), 1.0, "xla")
    assert calls[-1]["is_causal"] and "mask" not in calls[-1]
    calls.clear()
    attend(q, q, q, Mask(key_valid_BxS=jnp.asarray(VALID["suffix"]), causal=True), 1.0, "xla")
    by_lengths, by_dense = calls  # lax.cond traces both; the device picks one per batch
    assert by_lengths["is_causal"] and "mask" not in by_lengths
    np.testing.assert_array_equal(by_lengths["key_value_seq_lengths"], [6, 3, 0])
    assert by_dense["mask"].shape == (B, 1, L, L)


def test_cudnn_rules():
    assert cudnn_refusal(jnp.bfloat16, 64, 255, 255, False, 9.0) is None  # odd T: fine without bias
    assert cudnn_refusal(jnp.float16, 128, 256, 256, True, 8.0) is None
    assert cudnn_refusal(jnp.bfloat16, 256, 256, 256, False, 9.0) is None  # Hopper: up to 256
    refused = {
        "no GPU is visible": (jnp.bfloat16, 64, 256, 256, False, None),
        "compute capability >= 8.0, the GPU has 7.5": (jnp.bfloat16, 64, 256, 256, False, 7.5),
        "bfloat16 or float16, not float32": (jnp.float32, 64, 256, 256, False, 9.0),
        "head dim 60 is not a multiple of 8": (jnp.bfloat16, 60, 256, 256, False, 9.0),
        "head dim 256 is not a multiple of 8 up to 128": (jnp.bfloat16, 256, 256, 256, False, 8.0),
        "dense mask .* even lengths in training, got L=255": (jnp.bfloat16, 64, 255, 256, True, 9.0),
    }
    for reason, args in refused.items():
        assert re.search(reason, cudnn_refusal(*args) or ""), (reason, cudnn_refusal(*args))


def test_a_refused_cudnn_call_falls_back_to_xla_with_a_logged_reason(monkeypatch, caplog, rng):
    """What "auto" does on a host with a GPU, traced here with a stand-in GPU device: the cuDNN
    rules run at trace time, a refused call takes XLA with the reason logged once, the CPU branch
    still computes on this machine, and the CUDA branch exports."""
    monkeypatch.setattr(jax, "devices", lambda *a: [SimpleNamespace(platform="gpu",
                                                                    compute_capability="9.0")])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    attention._log_fallback.cache_clear()
    q64 = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with caplog.at_level(logging.WARNING, logger="tnt_jax.attention"):
        assert attention._cuda_kernel(q64, q64, dense=False) == "cudnn"
        assert not caplog.records
        q, k, v = (jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(3))
        mask = Mask(key_valid_BxS=jnp.asarray(VALID["suffix"]), causal=True)
        f = jax.jit(lambda q, k, v: attend(q, k, v, mask, 1.0, "auto"))
        ref = attend(q, k, v, mask, 1.0, "einsum")  # eager: fp32 reordering only, as above
        score = float(jnp.max(jnp.abs(jnp.einsum("blhk,bshk->bhls", q, k))))
        np.testing.assert_allclose(f(q, k, v), ref, rtol=0,
                                   atol=16 * 2.0**-24 * score * float(jnp.abs(ref).max()))
        exported = jax.export.export(f, platforms=["cuda"])(q, k, v)
    assert exported.platforms == ("cuda",)
    assert len(caplog.records) == 1  # once per reason, not once per call or layer
    assert "attention runs on XLA, not cuDNN: cuDNN flash attention takes bfloat16" in caplog.text


EXPORT = textwrap.dedent("""
    import functools, json
    import jax
    import tnt_jax.model as jmodel
    from tnt.config import build_run_config
    from tnt_jax import sharding as sh
    from tnt_jax.backend import Trainer

    jmodel.attend = functools.partial(jmodel.attend, implementation="xla")  # auto traces einsum here

    cfg = build_run_config("cpu-tiny", sets=["arch=decoder_only", "seq_len=16", "batch_size=4",
                                             "dtype=bfloat16", "remat=block", "d_model=64"])
    backend = Trainer(cfg, sh.build_mesh(sh.MeshShape.parse("data=2,fsdp=2", 4)))
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    state = jax.tree.map(abstract, backend.state)
    batch = {k: jax.ShapeDtypeStruct((4, 16), jax.numpy.int32, sharding=backend.batch_sharding)
             for k in ("dec_tokens", "labels")}
    exported = jax.export.export(backend._train_step, platforms=["cuda"])(state, batch)
    text = exported.mlir_module()
    out = {"platforms": list(exported.platforms), "devices": exported.nr_devices,
           "bf16": text.count("xbf16>"), "remat": "optimization_barrier" in text,
           "cudnn": "cudnn" in text.lower(),
           "fsdp_sharded": text.count('sdy.sharding<@mesh, [{"fsdp"}')}
    print(json.dumps(out))
""")


def test_bf16_train_step_exports_for_cuda_with_remat_on_a_sharded_mesh():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", EXPORT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["platforms"] == ["cuda"] and out["devices"] == 4
    assert out["bf16"] > 0 and out["remat"]
    assert not out["cudnn"]  # XLA attention: no cuDNN custom call
    assert out["fsdp_sharded"] > 0  # the matrices and their moments stay sharded
