"""experiments.bench on a tiny config: every field present, positive and consistent (no timing
assertions: the machine is shared)."""

from __future__ import annotations

import json

import pytest

from experiments import bench
from tnt.config import ModelConfig
from tnt.flops import datasheet_peak, flops_per_token

TINY = ["--preset", "cpu-tiny", "--steps", "2", "--warmup", "1", "--matmul-size", "256",
        "--set", "vocab_size=40", "--set", "d_model=32", "--seq-len", "16", "--batch-size", "2"]
POSITIVE = ["tokens_per_step", "step_time_s", "tokens_per_s", "peak_memory_bytes",
            "flops_per_token", "achieved_flops_per_s", "matmul_peak_flops_per_s", "mfu"]


def run_bench(capsys, *extra: str) -> dict:
    assert bench.main(["train", "--backend", "jax", "--json", *TINY, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def check_report(r: dict, arch: str, norm: str) -> None:
    assert (r["backend"], r["arch"], r["norm"]) == ("jax", arch, norm)
    for key in POSITIVE:
        assert r[key] > 0, key
    assert r["steps"] == 2
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["tokens_per_step"])
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"])
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["matmul_peak_flops_per_s"])
    assert r["mfu_peak"] == "measured fp32 matmul" and r["datasheet_peak_flops_per_s"] is None
    c = r["config"]
    enc = c["enc_len"] if arch == "encoder_decoder" else 0
    assert r["tokens_per_step"] == c["batch_size"] * (c["seq_len"] + enc)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_bench_train_json(capsys, arch):
    r = run_bench(capsys, "--arch", arch, "--norm", "rmsnorm")
    check_report(r, arch, "rmsnorm")
    assert r["config"]["d_model"] == 32 and r["tokens_per_step"] == 2 * 16 * (
        2 if arch == "encoder_decoder" else 1)


def test_bench_compare_norms(capsys):
    r = run_bench(capsys, "--arch", "decoder_only", "--compare-norms")
    assert set(r["runs"]) == {"ngpt", "rmsnorm"}
    for norm, run in r["runs"].items():
        check_report(run, "decoder_only", norm)
    ratio = r["runs"]["ngpt"]["step_time_s"] / r["runs"]["rmsnorm"]["step_time_s"]
    assert r["ngpt_over_rmsnorm_step_time"] == pytest.approx(ratio)


def test_bench_bad_config_is_an_error(capsys):
    assert bench.main(["train", "--set", "d_model=30", "--set", "n_heads=4"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_flops_per_token_matches_the_hand_count():
    cfg = ModelConfig(arch="decoder_only", d_model=256, n_heads=4, n_decoder_layers=4,
                      vocab_size=320, max_len_decoder=256)
    per_layer = 4 * 256 * 256 + 3 * 256 * 1024
    expected = 6 * (4 * per_layer + 256 * 320) + 4 * 12 * 256 * 256
    assert flops_per_token(cfg, 0, 256) == expected
    assert 28e6 < expected < 30e6  # the "about 29 MFLOP/token"
    enc_dec = ModelConfig(d_model=256, n_heads=4, n_encoder_layers=4, n_decoder_layers=4,
                          vocab_size=320)
    # the encoder and the cross-attention add work: more FLOPs per decoder token
    assert flops_per_token(enc_dec, 256, 256) * 2 > flops_per_token(cfg, 0, 256)


def test_bench_dtype_remat_and_grad_accum_flags(capsys):
    r = run_bench(capsys, "--arch", "decoder_only", "--dtype", "bfloat16", "--set", "remat=block",
                  "--set", "grad_accum=2")
    check_report(r, "decoder_only", "ngpt")
    c = r["config"]
    assert (c["dtype"], c["remat"], c["grad_accum"], c["batch_size"]) == ("bfloat16", "block", 2, 2)
    assert r["tokens_per_step"] == 2 * 16  # accumulation splits the same global batch


def test_bench_bad_grad_accum_is_an_error(capsys):
    assert bench.main(["train", *TINY, "--set", "grad_accum=3"]) == 2
    assert "grad_accum=3" in capsys.readouterr().err


def test_mfu_uses_the_datasheet_peak_on_a_known_accelerator():
    cfg = bench.run_config(bench.parse_args(["train", *TINY, "--dtype", "bfloat16"]))
    timing = {"compile_s": 1.0, "times": [0.5, 0.25, 0.5]}
    peak = {"matmul_size": 8192, "matmul_peak_flops_per_s": 600e12, "device": "NVIDIA H200",
            "accelerator": True}
    r = bench.report(cfg, "torch", timing, peak, 1 << 30)
    assert r["datasheet_peak_flops_per_s"] == 989e12 and r["mfu_peak"] == "datasheet bfloat16"
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / 989e12)
    # an accelerator the table does not know falls back to the measured matmul peak
    r = bench.report(cfg, "torch", timing, {**peak, "device": "Some NPU"}, 1 << 30)
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / 600e12)
    assert "datasheet" not in bench.describe(r) and "MFU" in bench.describe(r)


def test_datasheet_peak_table():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12  # the specific name first
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert datasheet_peak("TPU v4", "float32") is None  # no fp32 entry: no datasheet MFU
    assert datasheet_peak("cpu", "float32") is None
