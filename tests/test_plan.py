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
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    progress = captured.err.splitlines()  # each of the 3 compiles announced as it starts and ends
    assert [line.split(":")[0].split(" in ")[0] for line in progress] == [
        "compiling 1/3", "compiled 1/3", "compiling 2/3", "compiled 2/3", "compiling 3/3", "compiled 3/3"]
    assert "microbatch 1 x 1, remat none" in progress[2]
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
    *progress, line = captured.err.strip().splitlines()
    assert len(progress) == 2 and progress[0].startswith("compiling 1/5: train step")
    assert line.startswith("error: preset cpu-tiny: the train step needs ") and "MB" in line
    assert "but the device has 1.00 MB" in line


@pytest.mark.parametrize("bad", [["--device-memory", "0"], ["--set", "grad_accum=3"]])
def test_plan_bad_input_is_an_error(capsys, bad):
    assert plan.main([*TINY, *bad]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_parameter_count_is_for_the_vocabulary_in_use(tmp_path, capsys):
    """A tokenizer.json sizes the model as a training run does: its 5 ids, `<|endoftext|>` as bos
    and eos, and an added `<pad>`: 6 ids. The count grows by an embedding row and an lm_head
    column per id (and an s_z entry for nGPT)."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert plan.main([*TINY[:4], "--tokenizer", str(tmp_path / "tokenizer.json"), "--remat", "none",
                      "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    cfg = build_run_config("cpu-tiny", sets=["arch=decoder_only", "vocab_size=6"])
    assert r["config"]["vocab_size"] == 6 and r["parameter_count"] == plan.parameter_count(cfg)
    assert r["parameter_count"] * 4 == r["parameter_bytes"] and "tokenizer.json" in r["vocabulary"]
    paper, byte = (build_run_config("ngpt-0.5b", sets=[f"vocab_size={v}"]) for v in (32001, 259))
    assert plan.parameter_count(paper) - plan.parameter_count(byte) == (32001 - 259) * (2 * 1024 + 1)
    assert plan.main([*TINY[:4], "--tokenizer", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: tokenizer ")
