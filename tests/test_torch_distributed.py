"""torchrun DDP (gloo, 2 CPU processes) computes the same steps as one process on the same global
batch: the same losses and parameters, every rank applying the same unit-norm projection, rank 0
alone writing the checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch
    from tnt.config import build_run_config
    from tnt.data import BatchSpec
    from tnt_torch.backend import Trainer as TorchTrainer

    torch.manual_seed(0)
    cfg = build_run_config("cpu-tiny", sets=["arch=decoder_only", "seq_len=8", "batch_size=4"])
    spec = BatchSpec(cfg.model.arch, 4, 8, 8, cfg.model.bos_id)
    rng = np.random.default_rng(0)
    batches = [spec.make(rng.integers(3, 259, (4, spec.window))) for _ in range(3)]
    for b in batches:  # rank 0's rows hold fewer real labels than rank 1's
        b["labels"][0, :5] = cfg.model.pad_id
    backend = TorchTrainer(cfg)
    losses = [float(backend.step(b)["loss"]) for b in batches]
    val = backend.evaluate(iter(batches[:2]))
    backend.open(sys.argv[1], 2)
    backend.save({"kind": "byte"})
    rank = int(os.environ.get("RANK", "0"))
    params = {n: p.detach().numpy().tolist() for n, p in backend.net.named_parameters()}
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "val": val, "params": params, "rows": [backend.rows.start,
                   backend.rows.stop]}, f)
""")


def _run(cmd, tmp_path, name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, ckpt = tmp_path / name, tmp_path / f"{name}-ckpt"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    proc = subprocess.run([*cmd, str(tmp_path / "script.py"), str(ckpt), str(out)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in out.iterdir()}, ckpt


def test_two_gloo_ranks_match_one_process(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    one, one_ckpt = _run([sys.executable], tmp_path, "one")
    ddp, ddp_ckpt = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2"], tmp_path, "ddp")
    ref = one["rank0"]
    assert ref["rows"] == [0, 4] and ddp["rank0"]["rows"] == [0, 2] and ddp["rank1"]["rows"] == [2, 4]
    # fp32: the ranks' partial sums are added in another order than one process's; the nGPT
    # update is Adam-normalized, so parameters move by lr times a few-ulp relative gradient error.
    for rank in ("rank0", "rank1"):
        got = ddp[rank]
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=1e-5)
        assert abs(got["val"] - ref["val"]) < 1e-5
        for name, value in ref["params"].items():
            np.testing.assert_allclose(got["params"][name], value, rtol=0, atol=1e-5, err_msg=name)
    for name in ref["params"]:  # every rank holds exactly the same parameters
        assert ddp["rank0"]["params"][name] == ddp["rank1"]["params"][name], name
    written = sorted(p.name for p in ddp_ckpt.iterdir())
    assert written == sorted(p.name for p in one_ckpt.iterdir()) == ["3"]
    assert sorted(p.name for p in (ddp_ckpt / "3").iterdir()) == sorted(
        p.name for p in (one_ckpt / "3").iterdir())


def test_torchrun_pretrain_writes_once_and_resumes_in_one_process(tmp_path):
    """`torchrun -m experiments.pretrain --backend torch`: one config, one TensorBoard file, one
    report; its checkpoint resumes in a single process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    out = tmp_path / "run"
    flags = ["-m", "experiments.pretrain", "--backend", "torch", "--preset", "cpu-tiny",
             "--arch", "decoder_only", "--out", str(out), "--batch-size", "4", "--seq-len", "16",
             "--eval-every", "2", "--set", "eval_batches=1", "--set", "sample_tokens=2"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", *flags, "--max-steps", "2"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("final val loss") == 1
    assert len(list((out / "tb").iterdir())) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    one = subprocess.run([sys.executable, *flags, "--max-steps", "3", "--resume"], env=env,
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "steps 2->3" in one.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]


def test_mesh_flag_is_refused_for_torch(capsys):
    from experiments.pretrain import main

    assert main(["--backend", "torch", "--mesh", "data=2"]) == 2
    assert "--mesh and --coordinator are for --backend jax" in capsys.readouterr().err


FSDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch
    from tnt.config import build_run_config
    from tnt.data import BatchSpec
    from tnt_torch.backend import Trainer as TorchTrainer

    ckpt, out, resume = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sets = ["arch=decoder_only", "seq_len=8", "batch_size=4", "grad_accum=2", f"fsdp={world > 1}"]
    cfg = build_run_config("cpu-tiny", sets=sets)
    spec = BatchSpec(cfg.model.arch, 4, 8, 8, cfg.model.bos_id)
    rng = np.random.default_rng(0)
    batches = [spec.make(rng.integers(3, 259, (4, spec.window))) for _ in range(5)]
    for b in batches:  # the ranks' rows hold different numbers of real labels
        b["labels"][0, :5] = cfg.model.pad_id

    def dump(backend, name, losses, vals):
        state = {k: v.tolist() for k, v in backend.opt.canonical_state().items()}  # gathered
        params = {n: a.tolist() for n, a in backend.arrays(list(state_names)).items()}
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(out, name + ".json"), "w") as f:
                json.dump({"losses": losses, "vals": vals, "params": params, "opt": state}, f)

    from tnt.params import param_specs
    from tnt_torch import model as tm
    state_names = list(param_specs(cfg.model))
    built, init = [], tm.TnT.__init__  # the device of every model the trainer constructs

    def watched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(str(next(self.parameters()).device))

    tm.TnT.__init__ = watched
    if ckpt != "-":  # a fresh run of 3 steps, evaluated after steps 1 and 3, saved at 3
        backend = TorchTrainer(cfg)
        start = {n: a.tolist() for n, a in backend.arrays(state_names).items()}  # gathered
        losses = [float(backend.step(batches[0])["loss"])]
        vals = [backend.evaluate(iter(batches[:2]))]
        losses += [float(backend.step(b)["loss"]) for b in batches[1:3]]
        vals.append(backend.evaluate(iter(batches[:2])))
        backend.open(ckpt, 2)
        backend.save({"kind": "byte"})
        from tnt_torch.distributed import local
        ps = list(backend.net.parameters())  # what this rank holds: parameters, Adam's moments
        held = [sum(local(p).numel() for p in ps),
                sum(local(backend.opt.state[p]["exp_avg_sq"]).numel() for p in ps)]
        vals.append(held)  # compared separately
        dump(backend, "fresh", losses, vals)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(out, "init.json"), "w") as f:
                json.dump({"params": start, "built": built}, f)
    if resume != "-":  # resume another launch's step 3 and take steps 4 and 5
        backend = TorchTrainer(cfg)
        backend.restore(resume)
        dump(backend, "restored", [], [])
        dump(backend, "resumed", [float(backend.step(b)["loss"]) for b in batches[3:]], [])
""")


def _launch(cmd, tmp_path, name, resume="-", fresh=True):
    """FSDP_SCRIPT: a fresh run saved into `<name>-ckpt` (unless not `fresh`), then (with
    `resume`) a continuation of the checkpoint `resume`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, ckpt = tmp_path / name, (tmp_path / f"{name}-ckpt" if fresh else "-")
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    proc = subprocess.run([*cmd, str(tmp_path / "fsdp.py"), str(ckpt), str(out), str(resume)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in out.iterdir()}, ckpt


def _close(got, ref, atol):
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=atol)
    np.testing.assert_allclose(got["vals"], ref["vals"], rtol=0, atol=atol)
    for kind in ("params", "opt"):
        assert got[kind].keys() == ref[kind].keys()
        for name, value in ref[kind].items():
            np.testing.assert_allclose(got[kind][name], value, rtol=0, atol=atol, err_msg=name)


def test_fsdp2_matches_one_process_and_checkpoints_cross(tmp_path):
    """FSDP2 (2 gloo ranks, grad_accum=2 so `set_requires_gradient_sync` is exercised) takes the
    same steps as one process on the same global batch: losses, evaluations, gathered parameters
    and Adam moments; the ngpt matrices stay on the sphere although lm_head, wq, wk, wv and w_in are
    split along their normalized axis. Its checkpoint has the one-process layout and resumes in one
    process; an FSDP run resumes (reshards) the one-process checkpoint."""
    from safetensors.numpy import load_file

    from tnt.config import build_run_config
    from tnt.params import param_specs

    (tmp_path / "fsdp.py").write_text(FSDP_SCRIPT)
    one, one_ckpt = _launch([sys.executable], tmp_path, "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    fsdp, fsdp_ckpt = _launch(torchrun, tmp_path, "fsdp", resume=one_ckpt)
    # Built on the mesh: the FSDP trainer constructed its model on the meta device only, and
    # the shards it filled gather to one process's initial parameters bit for bit.
    assert one["init"]["built"] == ["cpu"] and fsdp["init"]["built"] == ["meta"]
    assert one["init"]["params"].keys() == fsdp["init"]["params"].keys()
    for name, value in one["init"]["params"].items():
        np.testing.assert_array_equal(fsdp["init"]["params"][name], value, err_msg=name)
    # fp32 tolerance as in the DDP test: partial sums in another order, Adam-normalized steps
    held = {name: run["fresh"]["vals"].pop() for name, run in (("one", one), ("fsdp", fsdp))}
    _close(fsdp["fresh"], one["fresh"], 1e-5)
    # rank 0 holds its dim-0 share (1/2, rounded up) of every parameter and Adam moment
    specs = param_specs(build_run_config("cpu-tiny", sets=["arch=decoder_only"]).model)
    total = sum(int(np.prod(s.shape)) for s in specs.values())
    share = sum(-(-s.shape[0] // 2) * int(np.prod(s.shape[1:])) for s in specs.values())
    assert held["one"] == [total, total] and held["fsdp"] == [share, share] and share < 0.51 * total
    projected = {n: s.project_axis for n, s in specs.items() if s.project_axis is not None}
    assert {"lm_head", "decoder.layers.0.attn.wq", "decoder.layers.0.mlp.w_out"} <= projected.keys()
    for name, axis in projected.items():
        norms = np.linalg.norm(np.asarray(fsdp["fresh"]["params"][name], np.float64), axis=axis)
        np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-6, err_msg=name)
    # the same files and tensors as one process's checkpoint (full tensors, gathered)
    for path in (one_ckpt / "3").iterdir():
        assert (fsdp_ckpt / "3" / path.name).is_file(), path.name
        if path.suffix == ".safetensors":
            a, b = load_file(str(path)), load_file(str(fsdp_ckpt / "3" / path.name))
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)
    # FSDP restored the one-process checkpoint exactly (sharded, then gathered back)
    saved = load_file(str(one_ckpt / "3" / "optimizer.safetensors"))
    for k, v in fsdp["restored"]["opt"].items():
        np.testing.assert_array_equal(np.asarray(v, np.float32), saved[k], err_msg=k)
    assert any(np.abs(saved[k]).max() > 0 for k in saved if k.endswith(".exp_avg_sq"))
    # one process resumes the FSDP checkpoint: the same continuation as FSDP from one process's
    back, _ = _launch([sys.executable], tmp_path, "back", resume=fsdp_ckpt, fresh=False)
    _close({**back["resumed"], "vals": []}, {**fsdp["resumed"], "vals": []}, 1e-5)


@pytest.mark.parametrize("sets", [[], ["arch=decoder_only"], ["norm=rmsnorm"],
                                  ["arch=decoder_only", "norm=rmsnorm"]])
def test_initial_values_are_the_models_own(sets):
    """`initial_values` (what FSDP2's meta-device build fills its shards from) draws the numbers
    `TnT(cfg, seed)` holds, bit for bit: the same generator consumed in the same order."""
    import torch

    from tnt.config import build_run_config
    from tnt_torch.model import TnT, initial_values

    cfg = build_run_config("cpu-tiny", sets=sets).model
    named = dict(TnT(cfg, seed=5).named_parameters())
    values = dict(initial_values(cfg, seed=5))
    assert values.keys() == named.keys()
    for name, value in values.items():
        assert torch.equal(value, named[name].detach()), name


def test_fsdp_needs_several_ranks(capsys, tmp_path):
    from experiments.pretrain import main

    out = tmp_path / "run"
    assert main(["--backend", "torch", "--preset", "cpu-tiny", "--out", str(out),
                 "--set", "fsdp=true"]) == 2
    assert "fsdp=true shards over the ranks of a multi-process run" in capsys.readouterr().err
    assert not out.exists()


def test_resume_takes_fsdp_from_its_own_command_line():
    """fsdp says how a launch spreads the steps: an FSDP2 run resumes in one process (or under
    DDP) without --set fsdp=false, and a one-process run resumes under FSDP2."""
    import dataclasses

    from tnt.config import build_run_config
    from tnt.run import resume_config

    saved = build_run_config("cpu-tiny", sets=["fsdp=true"])
    assert resume_config(saved).train.fsdp is False
    plain = dataclasses.replace(saved, train=dataclasses.replace(saved.train, fsdp=False))
    assert resume_config(plain, sets=["fsdp=true"]).train.fsdp is True


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_writing(
        capsys, tmp_path, monkeypatch):
    """Rank 0 of 3 (torchrun's environment) with 4 rows: refused before config.json exists."""
    from experiments.pretrain import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    out = tmp_path / "run"
    assert main(["--backend", "torch", "--preset", "cpu-tiny", "--out", str(out),
                 "--batch-size", "4"]) == 2
    assert "the batch of 4 rows (batch_size=4 / grad_accum=1) does not split over 3 ranks" in (
        capsys.readouterr().err)
    assert not out.exists()


def test_a_rank_without_torchrun_rendezvous_gets_an_error_line(capsys, tmp_path, monkeypatch):
    """WORLD_SIZE set by hand, without torchrun's MASTER_ADDR: one error line, not a traceback."""
    from experiments.pretrain import main

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--backend", "torch", "--preset", "cpu-tiny", "--out", str(tmp_path / "run"),
                 "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot join a torch process group of WORLD_SIZE=2 ranks")
    assert "MASTER_ADDR" in err and "Traceback" not in err
