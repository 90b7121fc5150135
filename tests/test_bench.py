"""experiments.bench on a tiny config: every field present, positive and consistent (no timing
assertions: the machine is shared)."""

from __future__ import annotations

import json

import pytest

from experiments import bench
from tnt.config import ModelConfig
from tnt.flops import flops_per_token

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
