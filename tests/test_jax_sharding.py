"""tnt_jax.sharding: the state built on the mesh (one jitted init with the rules' shardings, the
numbers of a one-device init), the same steps on any (data, fsdp, tensor) mesh as on one device,
really sharded parameters and Adam moments, checkpoints across mesh shapes, bad meshes refused.

The mesh runs share one subprocess with 8 forced CPU devices (each JAX start and compile costs
seconds); the mesh validation is pure and runs in this process.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tnt.config import ConfigError, build_run_config
from tnt_jax.sharding import MeshShape, check_fits, partition_spec

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    from functools import partial
    import jax, numpy as np
    from flax import nnx
    from tnt.config import build_run_config
    from tnt.data import BatchSpec
    from tnt.params import param_specs
    from tnt_jax import sharding as sh
    from tnt_jax.backend import Trainer as JaxTrainer
    from tnt_jax.model import TnT, to_canonical
    from tnt_jax.train import init_state

    cfg = build_run_config("cpu-tiny", sets=["arch=decoder_only", "seq_len=8", "batch_size=8"])
    spec = BatchSpec(cfg.model.arch, 8, 8, 8, cfg.model.bos_id)
    rng = np.random.default_rng(0)
    batches = [spec.make(rng.integers(3, 259, (8, spec.window))) for _ in range(4)]
    specs = param_specs(cfg.model)
    out, backends = {"devices": jax.device_count()}, {}

    # Built on the mesh: every random draw of a Trainer's init must be traced (inside the jitted
    # init), never a concrete array made on one device first.
    draws, normal = [], jax.random.normal
    def watched(*args, **kwargs):
        x = normal(*args, **kwargs)
        draws.append(isinstance(x, jax.core.Tracer))
        return x
    jax.random.normal = watched

    def initial(b):  # the fresh state as numpy; whether each leaf has the rules' sharding
        laid = jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), b.state,
                            b.state_sharding)
        rules = sh.param_shardings(b.mesh, b.cfg.model)
        adam = [x for x in jax.tree.leaves(b.state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(x, "mu")]  # Adam's moments take the params' shardings
        mu, nu = adam[0].mu, adam[0].nu
        return {"params": {k: sh.to_numpy(v).tolist() for k, v in b.state.params.items()},
                "opt": [sh.to_numpy(x).tolist() for x in jax.tree.leaves(b.state.opt_state)],
                "step": int(b.state.step), "laid": jax.tree.all(laid),
                "rules": all(b.state.params[n].sharding == rules[n] and
                             mu[n].sharding.spec == nu[n].sharding.spec == rules[n].spec
                             for n in rules)}

    for text in ("one", "data=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2"):
        devices = jax.devices()[:1] if text == "one" else None
        shape = sh.MeshShape.parse("" if text == "one" else text, 1 if devices else 8)
        b = backends[text] = JaxTrainer(cfg, sh.build_mesh(shape, devices))
        out.setdefault("init", {})[text] = initial(b)
        losses = [float(b.step(x)["loss"]) for x in batches[:3]]
        params = {k: sh.to_numpy(v) for k, v in b.state.params.items()}
        norms = [float(np.max(np.abs(np.linalg.norm(params[n].astype(np.float64),
                                                    axis=s.project_axis) - 1)))
                 for n, s in specs.items() if s.project_axis is not None]
        out[text] = {"losses": losses, "params": {k: v.tolist() for k, v in params.items()},
                     "sphere": max(norms),
                     "param_bytes": max(sh.bytes_per_device(b.state.params).values()),
                     "opt_bytes": max(sh.bytes_per_device(b.state.opt_state).values())}
    # The init program itself: no inputs, sharded outputs, and never the whole state on a device.
    b = backends["data=2,fsdp=4"]
    init = partial(init_state, cfg.model, b.tx, cfg.train.seed)
    memory = jax.jit(init, out_shardings=b.state_sharding).lower().compile().memory_analysis()
    out["init_memory"] = {"arguments": memory.argument_size_in_bytes,
                          "outputs": memory.output_size_in_bytes,
                          "temps": memory.temp_size_in_bytes,
                          "per_device": max(sh.bytes_per_device(b.state).values()),
                          "whole": sum(x.nbytes for x in jax.tree.leaves(b.state))}
    # rmsnorm has no unit-norm reduction in its init: every mesh draws the very same numbers.
    plain = build_run_config("cpu-tiny", sets=["arch=decoder_only", "norm=rmsnorm", "batch_size=8"])
    for text in ("one", "data=2,fsdp=2,tensor=2"):
        devices = jax.devices()[:1] if text == "one" else None
        shape = sh.MeshShape.parse("" if text == "one" else text, 1 if devices else 8)
        mesh = sh.build_mesh(shape, devices)
        out.setdefault("rmsnorm_init", {})[text] = initial(JaxTrainer(plain, mesh))
    jax.random.normal = normal
    out["draws"] = draws
    eager = TnT(cfg.model, nnx.Rngs(params=cfg.train.seed))
    out["eager"] = {k: v.tolist() for k, v in to_canonical(eager).items()}
    # Checkpoint across mesh shapes: written on 2x4x1, restored on one device and on 2x2x2.
    with tempfile.TemporaryDirectory() as tmp:
        writer = backends["data=2,fsdp=4"]
        writer.open(tmp, 2)
        writer.save({"kind": "byte"})
        writer.wait()
        saved = jax.tree.map(sh.to_numpy, writer.state._asdict())
        for text in ("one", "data=2,fsdp=2,tensor=2"):
            b = backends[text]
            b.restore(tmp)
            got = jax.tree.map(sh.to_numpy, b.state._asdict())
            same = jax.tree.all(jax.tree.map(np.array_equal, saved, got))
            kept = b.state.params["decoder.layers.0.mlp.w_in"].sharding.spec
            out[text]["restored"] = {"same": bool(same), "step": b.step_count, "spec": list(kept),
                                     "next_loss": float(b.step(batches[3])["loss"])}
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def runs():
    # XLA backend (LLVM) optimization level 0 halves the compile time of the four train steps; the
    # partitioning under test is the same, and every mesh is compared with a one-device run built alike.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                      "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# fp32 tolerance: a mesh only reorders float32 sums (the cross entropy over B*L*V terms, the
# weight gradients over B*L rows, the unit-norm reductions over d). Each reordered sum moves by a
# few ulps relative (2^-24 ~ 6e-8) times the depth of its reduction tree; Adam divides the
# gradient by its own magnitude, so a parameter moves by lr times that relative error per step.
# Over 3 steps of lr ~1e-3 on entries of size ~0.1-1 this stays far below 1e-5, the bound,
# which the test uses for losses and parameters alike.
TOL = 1e-5
MESHES = ("data=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2")


def test_every_mesh_matches_one_device(runs):
    assert runs["devices"] == 8
    one = runs["one"]
    for mesh in MESHES:
        np.testing.assert_allclose(runs[mesh]["losses"], one["losses"], rtol=0, atol=TOL,
                                   err_msg=mesh)
        for name, value in one["params"].items():
            np.testing.assert_allclose(runs[mesh]["params"][name], value, rtol=0, atol=TOL,
                                       err_msg=f"{mesh}: {name}")


def test_matrices_stay_on_the_sphere_on_every_mesh(runs):
    for mesh in ("one", *MESHES):
        assert runs[mesh]["sphere"] < 1e-5, mesh  # | ||w|| - 1 | of every projected matrix


def test_fsdp_divides_the_per_device_bytes(runs):
    """2x4x1: every matrix holds 1/4 of its rows on each device, vectors are whole; Adam's two
    moments follow the parameters."""
    cfg = build_run_config("cpu-tiny", sets=["arch=decoder_only"]).model
    from tnt.params import param_specs

    specs = param_specs(cfg).values()
    matrices = sum(4 * int(np.prod(s.shape)) for s in specs if s.is_matrix)
    vectors = sum(4 * int(np.prod(s.shape)) for s in specs if not s.is_matrix)
    fsdp = runs["data=2,fsdp=4"]
    assert fsdp["param_bytes"] == matrices // 4 + vectors
    assert runs["data=8"]["param_bytes"] == matrices + vectors
    assert fsdp["param_bytes"] < 0.4 * runs["data=8"]["param_bytes"]
    # mu and nu take the params' shardings; the rest (step counters) is a few scalars.
    assert 2 * fsdp["param_bytes"] <= fsdp["opt_bytes"] <= 2 * fsdp["param_bytes"] + 64


def test_checkpoint_restores_across_mesh_shapes(runs):
    """Saved on 2x4x1, restored bit for bit on one device and on 2x2x2 (keeping the target mesh's
    sharding); the next step then agrees across the two."""
    one, tp = runs["one"]["restored"], runs["data=2,fsdp=2,tensor=2"]["restored"]
    assert one["same"] and tp["same"] and one["step"] == tp["step"] == 3
    assert tp["spec"] == ["fsdp", "tensor"]
    assert abs(one["next_loss"] - tp["next_loss"]) < TOL


def test_the_state_is_built_on_the_mesh(runs):
    """Every Trainer's init ran traced (no random draw was concrete), each leaf comes out with the
    rules' sharding, and the init is one program without inputs whose outputs are the devices'
    shards: it never holds the whole state on a device (2x4x1: about a third of it)."""
    assert runs["draws"] and all(runs["draws"])
    for init in (*runs["init"].values(), *runs["rmsnorm_init"].values()):
        assert init["laid"] and init["rules"] and init["step"] == 0
    m = runs["init_memory"]
    assert m["arguments"] == 0
    # outputs are this device's shards (plus a few bytes of scalar alignment per leaf)
    assert m["per_device"] <= m["outputs"] <= m["per_device"] + 64 * 64
    assert m["outputs"] + m["temps"] < m["whole"]


def test_the_sharded_init_equals_the_unsharded_one(runs):
    """The same numbers on every mesh as on one device for the same seed: bit for bit where the
    init has no reduction (rmsnorm, Adam's zero moments, the step), and for nGPT's unit-norm
    matrices up to the summation order of the norm, which crosses the fsdp shards: the sum of n
    squares moves by at most (n - 1) units of round-off (2^-24) relatively, its inverse square
    root by half that, plus a few roundings: |y - y'| <= (n + 4) 2^-24 max|y|. The eager build
    (a model constructed outside jit) gives the same numbers up to the same bound."""
    from tnt.params import param_specs

    one = runs["rmsnorm_init"]["one"]
    assert runs["rmsnorm_init"]["data=2,fsdp=2,tensor=2"] == one
    cfg = build_run_config("cpu-tiny", sets=["arch=decoder_only"]).model
    specs = param_specs(cfg)
    ref = runs["init"]["one"]
    assert any(np.abs(v).max() > 0 for v in map(np.asarray, ref["params"].values()))
    for mesh, got in [*runs["init"].items(), ("eager", {"params": runs["eager"]})]:
        if mesh != "eager":
            assert got["opt"] == ref["opt"] and got["step"] == 0, mesh
        for name, value in ref["params"].items():
            spec, a, b = specs[name], np.asarray(got["params"][name]), np.asarray(value)
            if spec.project_axis is None and mesh != "eager":
                np.testing.assert_array_equal(a, b, err_msg=f"{mesh}: {name}")
            else:  # a normalized matrix, or the eager build's own rounding of the draws
                n = spec.shape[spec.project_axis] if spec.project_axis is not None else 1
                tol = (n + 4) * 2.0**-24 * np.abs(b).max()
                np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=f"{mesh}: {name}")


@pytest.mark.parametrize("text, words", [
    ("data=2,fsdp=2", ["uses 4 devices", "8 are available"]),
    ("data=2,pipeline=4", ["unknown mesh axis 'pipeline'"]),
    ("fsdp=3", ["fsdp x tensor = 3", "data"]),
    ("data=8,data=1", ["data is given twice"]),
    ("data=x", ["data needs an integer"]),
    ("data=0,fsdp=8", ["data must be a positive integer"]),
])
def test_bad_mesh_text_is_refused_naming_the_axis(text, words):
    with pytest.raises(ConfigError) as e:
        MeshShape.parse(text, 8)
    for word in words:
        assert word in str(e.value)


def test_default_mesh_puts_every_device_on_data():
    assert MeshShape.parse("", 8) == MeshShape(8, 1, 1)
    assert MeshShape.parse("tensor=2", 8) == MeshShape(4, 1, 2)


@pytest.mark.parametrize("shape, sets, words", [
    (MeshShape(2, 1, 4), ["n_heads=2"], ["tensor=4", "n_heads=2"]),
    (MeshShape(1, 1, 2), ["n_heads=2", "mlp_hidden=129"], ["tensor=2", "hidden=129"]),
    (MeshShape(1, 3, 1), ["d_model=64", "n_heads=2"], ["fsdp=3", "d_model=64"]),
    (MeshShape(2, 2, 1), ["batch_size=6"], ["batch_size=6", "data x fsdp = 2 x 2"]),
    (MeshShape(2, 2, 1), ["batch_size=8", "grad_accum=4"], ["grad_accum=4", "data x fsdp"]),
])
def test_meshes_the_model_cannot_split_over_are_refused(shape, sets, words):
    cfg = build_run_config("cpu-tiny", sets=sets)
    with pytest.raises(ConfigError) as e:
        check_fits(shape, cfg)
    for word in words:
        assert word in str(e.value)


def test_every_parameter_has_a_rule_and_matrices_are_fsdp_sharded_on_d_model():
    from tnt.params import param_specs

    for norm in ("ngpt", "rmsnorm"):
        cfg = build_run_config("cpu-tiny", sets=[f"norm={norm}"]).model
        for name, spec in param_specs(cfg).items():
            p = partition_spec(spec)
            assert len(p) == len(spec.shape), name
            if spec.is_matrix:  # the d_model axis (nGPT's projection axis) is the fsdp one
                d_axis = 1 if name.endswith((".wo", ".w_out", ".embed")) else 0
                assert p[d_axis] == "fsdp", name
                if spec.project_axis is not None:
                    assert spec.project_axis == d_axis, name
            heads = {"wq": (None, "tensor"), "wk": (None, "tensor"), "wv": (None, "tensor"),
                     "wo": ("tensor", None), "w_in": (None, "tensor"), "w_out": ("tensor", None),
                     "s_qk": ("tensor",), "s_uv": ("tensor",)}.get(spec.attr, (None,) * len(p))
            assert tuple(a if a == "tensor" else None for a in p) == heads, name


def test_a_logical_axis_without_a_rule_is_named():
    from tnt.params import ParamSpec

    with pytest.raises(KeyError, match="logical axis 'stream' of parameter x"):
        partition_spec(ParamSpec("x", (4,), "alpha", ("stream",)), rules={"embed": "fsdp"})


def test_pretrain_refuses_a_bad_mesh_with_one_error_line(tmp_path, capsys):
    from experiments.pretrain import main

    out = tmp_path / "run"
    assert main(["--preset", "cpu-tiny", "--mesh", "data=1,tensor=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: mesh") and "tensor=2" in err[0]
    assert not out.exists()  # nothing was written
