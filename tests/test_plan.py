"""experiments.plan compiles the real train step for abstract inputs: its parameter and optimizer
bytes are exact, it reports XLA's memory and FLOPs, finds the largest microbatch, and refuses a
config that does not fit with one `error:` line naming the memory needed."""

from __future__ import annotations

import json
import math

import pytest

from experiments import plan
from tnt.config import build_run_config
from tnt.flops import flops_per_token
from tnt.params import param_specs

TINY = ["--preset", "cpu-tiny", "--set", "arch=decoder_only", "--set", "vocab_size=40"]


def test_parameter_and_optimizer_bytes_are_the_parameter_sizes():
    cfg = build_run_config("cpu-tiny", sets=["vocab_size=40"])  # encoder-decoder
    r = plan.compile_step(cfg)
    param_bytes = 4 * sum(math.prod(s.shape) for s in param_specs(cfg.model).values())
    assert r["parameter_bytes"] == param_bytes
    # two Adam moments of every parameter, plus a few int32 step counters
    assert 0 <= r["optimizer_state_bytes"] - 2 * param_bytes <= 4 * 8
    assert r["argument_bytes"] >= r["parameter_bytes"] + r["optimizer_state_bytes"]
    assert r["aliased_bytes"] >= r["parameter_bytes"] + r["optimizer_state_bytes"]  # donated
    assert r["temporary_bytes"] > 0 and r["compiled_flops"] > 0


def test_plan_json_finds_the_largest_microbatch(capsys):
    assert plan.main([*TINY, "--device-memory", "1e9", "--remat", "none", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] and r["needed_bytes"] <= 1e9 and r["compiler"].startswith("XLA:CPU")
    [fit] = r["microbatch"]
    assert (fit["remat"], fit["largest_microbatch"], fit["grad_accum"]) == ("none", 8, 1)
    assert fit["bytes_per_sequence"] > 0
    cfg = build_run_config("cpu-tiny", sets=TINY[3::2])
    analytic = flops_per_token(cfg.model, 0, cfg.train.seq_len) * 8 * cfg.train.seq_len
    # the compiler counts every op, the analytic count only the matmuls: more, but same order
    assert analytic <= fit["flops_per_step"] <= 3 * analytic


def test_largest_microbatch_counts_the_gradient_sum():
    # fixed 100 B, 10 B per sequence, a 25 B gradient sum whenever the batch of 8 is split
    assert plan.largest_microbatch(100, 10, 25, 8, 180) == 8  # no split, no gradient sum
    assert plan.largest_microbatch(100, 10, 25, 8, 179) == 4  # 100 + 40 + 25
    assert plan.largest_microbatch(100, 10, 25, 8, 164) == 2
    assert plan.largest_microbatch(100, 10, 25, 6, 159) == 3  # divisors of the batch only
    assert plan.largest_microbatch(100, 10, 25, 8, 134) == 0


def test_plan_refuses_a_config_that_does_not_fit(capsys):
    assert plan.main([*TINY, "--device-memory", "1e6"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: preset cpu-tiny: the train step needs ") and "MB" in line
    assert "but the device has 1.00 MB" in line


@pytest.mark.parametrize("bad", [["--device-memory", "0"], ["--set", "grad_accum=3"]])
def test_plan_bad_input_is_an_error(capsys, bad):
    assert plan.main([*TINY, *bad]) == 2
    assert capsys.readouterr().err.startswith("error: ")
