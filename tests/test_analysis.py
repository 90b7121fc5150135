"""tnt/analysis.py's numbers, experiments.analyze's plots and report, and the TensorBoard dynamics
of `experiments.pretrain`, on tiny runs of both backends."""

import importlib
import json
import re

import numpy as np
import pytest
from helpers import tiny_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments import analyze
from experiments.pretrain import main as pretrain_main
from tnt import analysis
from tnt.checkpoints import read_checkpoint
from tnt.dynamics import Dynamics, chosen_layers
from tnt.events import EventWriter
from tnt.params import param_specs, unit_norm

PNG_SIZE = (int(analyze.FIGSIZE[0] * analyze.DPI), int(analyze.FIGSIZE[1] * analyze.DPI))


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in param_specs(cfg).items():
        if spec.init_std is None:
            out[name] = (spec.init_value + 0.01 * rng.standard_normal(spec.shape)).astype(np.float32)
        else:
            w = rng.standard_normal(spec.shape).astype(np.float32)
            out[name] = unit_norm(w, spec.project_axis) if spec.project_axis is not None else w
    return out


# ---------------------------------------------------------------------------------------------
# Numbers


def test_condition_number_of_orthogonal_and_diagonal():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 32)))
    for fast in (False, True):
        assert analysis.condition_number(q, fast) == pytest.approx(1.0, abs=1e-9)
        assert analysis.condition_number(np.diag([1.0, 10.0]), fast) == pytest.approx(10.0, rel=1e-12)
        assert analysis.condition_number(np.diag([1.0, 0.0]), fast) == float("inf")
    wide = np.random.default_rng(1).standard_normal((16, 64))
    assert analysis.condition_number(wide, True) == pytest.approx(analysis.condition_number(wide),
                                                                   rel=1e-8)


def test_spectrum_is_normalized_by_its_median():
    # rows +-2e1, +-e2, +-e3: covariance diag(8, 2, 2) / 5 -> eigenvalues / median = [4, 1, 1]
    e = np.eye(3)
    x = np.stack([2 * e[0], -2 * e[0], e[1], -e[1], e[2], -e[2]])
    np.testing.assert_allclose(analysis.covariance_spectrum(x), [4.0, 1.0, 1.0], rtol=1e-12)


def test_pairwise_cosines_all_pairs_and_sampled():
    cos = analysis.pairwise_cosines(np.eye(5) * 3.0)
    assert cos.shape == (10,) and np.allclose(cos, 0.0)
    same = analysis.pairwise_cosines(np.ones((4, 3)))
    np.testing.assert_allclose(same, 1.0)
    big = np.random.default_rng(0).standard_normal((100_000, 8))  # V x V would be 80 GB
    sampled = analysis.pairwise_cosines(big, max_pairs=1000)
    assert sampled.shape == (1000,) and np.all(np.abs(sampled) <= 1 + 1e-12)
    assert abs(sampled.mean()) < 0.05  # random directions in 8-d: mean ~0


def test_eigen_lrs_scalers_and_split_of_s_uv():
    cfg = tiny_config()
    p = random_params(cfg)
    F = cfg.hidden
    p["decoder.layers.1.mlp.s_uv"] = np.r_[np.full(F, 1.0), np.full(F, 3.0)].astype(np.float32)
    p["decoder.layers.0.cross.alpha"] = np.r_[np.full(16, -0.1), np.full(16, 0.3)].astype(np.float32)
    specs = param_specs(cfg)
    lrs = analysis.eigen_lrs(p, specs)
    assert set(lrs) == {"encoder", "decoder"} and set(lrs["decoder"]) == {"attn", "cross", "mlp"}
    np.testing.assert_allclose(lrs["decoder"]["cross"][0], [0.2, 0.1])  # |alpha|: mean, std
    sc = analysis.scalers(p, specs)
    np.testing.assert_allclose(sc["decoder"]["mlp.s_u"][1], [1.0, 0.0])
    np.testing.assert_allclose(sc["decoder"]["mlp.s_v"][1], [3.0, 0.0])
    assert set(sc["decoder"]) == {"attn.s_qk", "cross.s_qk", "mlp.s_u", "mlp.s_v"}
    cond = analysis.condition_numbers(p, specs)
    assert set(cond["decoder"]) == {f"{b}.{w}" for b in ("attn", "cross") for w in
                                    ("wq", "wk", "wv", "wo")} | {"mlp.w_in", "mlp.w_out"}
    assert cond["decoder"]["attn.wq"].shape == (2,) and np.all(cond["decoder"]["attn.wq"] >= 1)


def test_rmsnorm_gets_what_applies():
    cfg = tiny_config(norm="rmsnorm")
    p, specs = random_params(cfg), param_specs(cfg)
    assert analysis.eigen_lrs(p, specs) == {} and not analysis.is_ngpt(specs)
    assert set(analysis.scalers(p, specs)["decoder"]) == {"attn_norm", "cross_norm", "mlp_norm"}
    assert analyze.plot_eigen_lrs(p, specs) is None
    assert (analyze.plot_scalers(p, specs) is not None
            and analyze.plot_condition_numbers(p, specs) is not None)


def test_norms_plot_of_unit_norm_embedding_is_flat_at_one():
    cfg = tiny_config(arch="decoder_only")
    fig = analyze.plot_embedding_norms(analysis.embedding_stats(random_params(cfg), param_specs(cfg)))
    ax = fig.axes[0]
    y = ax.lines[0].get_ydata()
    assert len(y) == 40
    np.testing.assert_allclose(y, 1.0, atol=1e-6)
    lo, hi = ax.get_ylim()
    assert lo < 1.0 < hi


def test_token_params_drop_the_pad_along_every_vocabulary_axis():
    cfg = tiny_config()
    p = random_params(cfg)
    out = analysis.token_params(p, param_specs(cfg), pad_id=3)
    V = cfg.vocab_size
    assert out["encoder.embed"].shape[0] == out["decoder.embed"].shape[0] == V - 1
    assert out["lm_head"].shape[1] == V - 1 and out["s_z"].shape == (V - 1,)
    np.testing.assert_array_equal(out["lm_head"], np.delete(p["lm_head"], 3, axis=1))
    np.testing.assert_array_equal(out["decoder.embed"][3], p["decoder.embed"][4])
    assert out["decoder.layers.0.attn.wq"] is p["decoder.layers.0.attn.wq"]


def test_dynamics_layers_and_values():
    assert chosen_layers(3, 4) == [0, 1, 2]
    assert chosen_layers(24, 4) == [0, 8, 15, 23]
    cfg = tiny_config(n_decoder_layers=6)
    dyn = Dynamics(cfg, max_cond_layers=2)
    assert {n for n in dyn.matrices if n.startswith("decoder.layers.")} == {
        n for n in dyn.matrices if re.match(r"decoder\.layers\.[05]\.", n)}
    scalars, hists = dyn.values(random_params(cfg))
    assert "dyn/alpha/decoder.layers.5.mlp" in scalars and "dyn/scaler/s_z" in scalars
    assert "dyn/scaler/decoder.layers.3.mlp.s_v" in scalars  # scalers: every layer
    assert "dyn/cond/decoder.layers.5.attn.wq" in scalars
    assert "dyn/cond/decoder.layers.3.attn.wq" not in scalars
    assert "hist/decoder.layers.0.attn.s_qk" in hists


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30, 3e38])
def test_dynamics_of_diverged_weights_log_without_error(bad, tmp_path):
    """Non-finite or huge weights (an `--lr 1e30` run) give nan/inf scalars and no histogram for
    what TensorBoard's buckets cannot hold, never an error: stopping is the divergence guard's."""
    cfg = tiny_config(norm="rmsnorm")
    dyn = Dynamics(cfg)
    params = {n: a.astype(np.float64) for n, a in random_params(cfg).items()}
    matrix, gain = dyn.matrices[0], dyn.scalers[0]
    params[matrix] = params[matrix] * (bad if np.isfinite(bad) else 1.0)
    params[matrix].flat[0] = bad
    params[gain] = np.full_like(params[gain], bad)
    scalars, hists = dyn.values(params)
    cond = scalars[f"dyn/cond/{matrix}"]
    assert np.isnan(cond) if not np.isfinite(bad) else np.isfinite(cond)
    assert f"hist/{gain}" not in hists and len(hists) == len(dyn.scalers) - 1

    class Arrays:  # what the loop's backend gives `log`
        def arrays(self, names):
            return {n: params[n] for n in names}

    writer = EventWriter(tmp_path)
    dyn.log(writer, Arrays(), 1)
    writer.close()


# ---------------------------------------------------------------------------------------------
# Tiny runs of both backends: checkpoints, TensorBoard dynamics, the analyze CLI


RUNS = [("jax", "encoder_decoder", "ngpt"), ("torch", "encoder_decoder", "ngpt"),
        ("jax", "decoder_only", "rmsnorm")]


@pytest.fixture(scope="module", params=RUNS, ids=["-".join(r) for r in RUNS])
def run_dir(request, corpus, tmp_path_factory):
    backend, arch, norm = request.param
    out = tmp_path_factory.mktemp(f"{backend}-{arch}-{norm}") / "run"
    rc = pretrain_main(["--backend", backend, "--preset", "cpu-tiny", "--arch", arch, "--norm", norm,
                        "--data", corpus, "--out", str(out), "--max-steps", "4", "--eval-every", "2",
                        "--seq-len", "16", "--set", "eval_batches=1", "--set", "log_every=2",
                        "--analysis-every", "2", "--set", "sample_tokens=2"])
    assert rc == 0
    return out, backend, norm


def test_alphas_read_back_equal_the_model(run_dir):
    out, backend, norm = run_dir
    ckpt = read_checkpoint(out)
    assert ckpt.backend == backend and ckpt.step == 4
    module = importlib.import_module(f"tnt_{backend}")
    model, _, _ = module.load_checkpoint(out)
    held = module.to_canonical(model)
    alphas = [n for n in held if n.endswith(".alpha")]
    assert bool(alphas) == (norm == "ngpt")
    specs = param_specs(ckpt.config.model)
    for name in alphas + analysis.scaler_names(specs):
        np.testing.assert_array_equal(ckpt.params[name], held[name], err_msg=name)
    for stack, blocks in analysis.eigen_lrs(ckpt.params, specs).items():
        for block, table in blocks.items():
            for i, (mean, _) in enumerate(table):
                assert mean == pytest.approx(np.abs(held[f"{stack}.layers.{i}.{block}.alpha"]).mean())


def test_dynamics_in_tensorboard(run_dir):
    out, backend, norm = run_dir
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    ckpt = read_checkpoint(out)
    if norm == "ngpt":
        events = acc.Scalars("dyn/alpha/decoder.layers.0.attn")
        assert [e.step for e in events] == [2, 4]
        # the value logged at the last step is the checkpoint's
        want = np.abs(ckpt.params["decoder.layers.0.attn.alpha"]).mean()
        assert events[-1].value == pytest.approx(want, rel=1e-6)
        assert {"dyn/scaler/s_z", "dyn/scaler/decoder.layers.0.mlp.s_u",
                "dyn/scaler/decoder.layers.0.cross.s_qk"} <= scalars
        assert {"hist/s_z", "hist/decoder.layers.0.attn.s_qk"} <= hists
    else:
        assert "dyn/scaler/decoder.layers.0.attn_norm" in scalars
        assert "dyn/wnorm/decoder.embed" in scalars
        assert "hist/decoder.final_norm.scale" in hists
    cond = acc.Scalars("dyn/cond/decoder.layers.0.attn.wq")[-1].value
    assert cond == pytest.approx(analysis.condition_number(
        ckpt.params["decoder.layers.0.attn.wq"]), rel=1e-4)
    assert {"val/loss", "val/elapsed_sec"} <= scalars


def test_analyze_writes_readable_pngs_and_a_report_linking_them(run_dir, tmp_path, capsys):
    out, backend, norm = run_dir
    dest = tmp_path / "analysis"
    assert analyze.main([str(out / "checkpoints" / "4"), "--out", str(dest)]) == 0
    assert "report.html" in capsys.readouterr().out
    pngs = sorted(p.name for p in dest.glob("*.png"))
    expected = {"scalers.png", "condition_numbers.png", "embedding_norms.png",
                "embedding_spectrum.png", "embedding_cosines.png", "training_curves.png"}
    expected |= {"eigen_lrs.png"} if norm == "ngpt" else set()
    assert set(pngs) == expected
    for name in pngs:
        with Image.open(dest / name) as im:
            im.verify()
        with Image.open(dest / name) as im:
            assert im.format == "PNG" and im.size == PNG_SIZE, name
    page = (dest / "report.html").read_text()
    assert set(re.findall(r'src="([^"]+)"', page)) == set(pngs)
    assert set(re.findall(r'href="([^"]+\.png)"', page)) == set(pngs)
    assert backend in page and "final val loss" in page
    if norm != "ngpt":
        assert "eigen_lrs.png" in page.split("Not applicable here:")[1].split("</p>")[0]
    facts, numbers = json.loads((dest / "numbers.json").read_text()).values()
    assert facts["step"] == 4 and facts["backend"] == backend  # typed, not strings
    assert numbers and all(isinstance(v, float) for v in numbers.values())


def test_analyze_refuses_a_path_without_checkpoint_or_events(tmp_path, capsys):
    assert analyze.main([str(tmp_path)]) == 2
    assert "neither a TnT checkpoint" in capsys.readouterr().err


def test_analyze_names_an_output_folder_it_cannot_write(run_dir, tmp_path, capsys):
    """A file, a path under a file, and a path no one may create (/proc takes no new entries,
    even for root, which a read-only run folder does not stop): one line each, nothing written."""
    out, _, _ = run_dir
    file = tmp_path / "file"
    file.write_text("kept")
    for target, message in [(file, f"--out {file} is a file"),
                            (file / "sub", f"cannot write the analysis folder {file / 'sub'}"),
                            ("/proc/tnt-analysis", "cannot write the analysis folder /proc/tnt-analysis"),
                            ("", "--out is empty")]:
        assert analyze.main([str(out), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert file.read_text() == "kept"
