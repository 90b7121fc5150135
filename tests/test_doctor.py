"""experiments.doctor on the CPU: both frameworks report, no warning when neither sees an
accelerator, and a warning naming the blind framework when only one does; `--full`'s float32
parity case passes within its derived tolerance, and fails when one side's weight is off."""

from __future__ import annotations

import json
import math

import tnt_torch
from experiments import acceptance, doctor, parity

PARITY_STEPS = 2


def test_doctor_on_this_machine(capsys):
    rc = doctor.main(["--json"])
    r = json.loads(capsys.readouterr().out)
    names = [f["framework"] for f in r["frameworks"]]
    assert names == ["jax", "torch"]
    assert all(f["version"] and f["devices"] for f in r["frameworks"])
    same = r["frameworks"][0]["accelerator"] == r["frameworks"][1]["accelerator"]
    assert (rc, r["warnings"] == []) == ((0, True) if same else (1, False))


def test_doctor_warns_when_only_one_framework_sees_a_gpu(monkeypatch, capsys):
    gpu = {"framework": "jax", "version": "9.9", "backend": "gpu", "devices": ["gpu:NVIDIA H200"],
           "accelerator": True}
    cpu = {"framework": "torch", "version": "2.13.0+cpu", "cuda": None, "devices": ["cpu"],
           "accelerator": False}
    monkeypatch.setattr(doctor, "info", {"jax": gpu, "torch": cpu}.get)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "jax 9.9: gpu:NVIDIA H200" and out[1] == "torch 2.13.0+cpu: cpu"
    assert out[2].startswith("warning: jax sees gpu:NVIDIA H200 but torch 2.13.0+cpu sees only")
    monkeypatch.setattr(doctor, "info", {"jax": {**gpu, "devices": ["cpu:cpu"], "accelerator": False},
                                         "torch": {**cpu, "devices": ["cuda:NVIDIA H200"],
                                                   "accelerator": True}}.get)
    assert doctor.main([]) == 1
    assert "torch sees cuda:NVIDIA H200 but jax 9.9 sees only the CPU" in capsys.readouterr().out
    assert doctor.warnings_for(cpu, {**cpu, "framework": "jax"}) == []


def test_doctor_full_on_the_cpu_trains_both_frameworks(capsys):
    assert doctor.main(["--full", "--json", "--steps", "1", "--parity-steps", str(PARITY_STEPS)]) == 0
    r = json.loads(capsys.readouterr().out)
    [case] = r["parity"]  # the CPU's one float32 parity case, passing within its derived tolerance
    assert (case["case"], case["device"], case["steps"]) == ("decoder_only/ngpt", "cpu", PARITY_STEPS)
    assert set(case["max_abs_diff"]) == set(case["tolerance"]) == {"logits", "loss", "params", "sphere"}
    assert case["pass"] and all(0 <= case["max_abs_diff"][k] <= case["tolerance"][k]
                                for k in case["tolerance"])
    rows = r["full"]
    assert [(x["framework"], x["case"]) for x in rows] == [
        (f, c) for f in ("jax", "torch") for c in ("gpu-small", "decoder-124m")]
    for x in rows:
        assert x["dtype"] == "bfloat16"
        assert math.isfinite(x["tokens_per_s"]) and x["tokens_per_s"] > 0
        assert math.isfinite(x["mfu"]) and x["mfu"] > 0
        assert x["predicted_peak_bytes"] > 0
        # the CPU has no device-memory counter: nothing measured, nothing invented
        assert x["measured_peak_bytes"] is None and x["remat_saving_bytes"] is None
    line = acceptance.describe(rows[0])
    assert line.startswith("jax   gpu-small") and "tokens/s" in line and "peak n/a measured" in line


def test_a_perturbed_weight_fails_the_parity_case():
    """One embedding entry 0.01 off in torch's copy: the logits and the trained weights move past
    their tolerances, and the case fails."""
    cfg = parity.config("decoder_only", "ngpt")
    jm, tm, weights = parity.models(cfg, "cpu")
    embed = weights["decoder.embed"].copy()
    embed[3, 0] += 0.01
    tm = tnt_torch.load_canonical(tm, {**weights, "decoder.embed": embed})
    r = parity.run_case("decoder_only", "ngpt", "cpu", PARITY_STEPS, built=(jm, tm, weights))
    diff, tol = r["max_abs_diff"], r["tolerance"]
    assert diff["logits"] > tol["logits"] and diff["params"] > tol["params"]
    assert not r["pass"]
    assert doctor.describe_parity(r).endswith("FAIL")
