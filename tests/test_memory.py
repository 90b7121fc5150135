"""The analytic activation-memory model (tnt/memory.py) against XLA:CPU's `memory_analysis()`
where the compiler sees the same quantity: einsum attention, float32, no remat."""

from __future__ import annotations

import json

import pytest

from experiments import plan
from tnt.config import GPU_DEVICES, build_run_config
from tnt.memory import BYTES, choose_microbatch, kept_per_token, step_memory


def tiny(layers: int, rows: int, seq: int, **sets):
    base = {"arch": "decoder_only", "vocab_size": 40, "d_model": 64, "n_heads": 4,
            "n_decoder_layers": layers, "seq_len": seq, "max_len_decoder": seq, "batch_size": rows,
            **sets}
    return build_run_config("cpu-tiny", sets=[f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize("seq", [32, 128])  # one causal block of queries, and two
def test_kept_bytes_per_layer_and_token_match_the_compiler(seq):
    # temporaries for 2 and 4 layers at microbatches of 1 and 2 sequences: the difference of the
    # differences is two layers' kept activations for one sequence (constants and the logits cancel)
    t = {(n, r): plan.compile_step(tiny(n, r, seq))["temporary_bytes"] for n in (2, 4) for r in (1, 2)}
    measured = ((t[4, 2] - t[4, 1]) - (t[2, 2] - t[2, 1])) / 2 / seq
    cfg = tiny(2, 1, seq).model
    analytic = kept_per_token(cfg, seq, flash=False, causal=True)
    # the count lists the tensors the backward reads; XLA's fusions decide per elementwise step
    # whether to keep a D-wide float32 intermediate or recompute it: up to 4 such steps either way
    # (the per-head norm's and the two residual norms' inputs and scales)
    assert abs(measured - analytic) <= 4 * cfg.d_model * 4, (measured, analytic)


def test_flash_remat_and_bfloat16_keep_less():
    cfg = tiny(4, 8, 256)
    p = 10_000
    einsum, flash = step_memory(cfg, p, flash=False), step_memory(cfg, p, flash=True)
    # flash drops the 3 float32 [H, S] rows per token of every layer, keeping one float32 per head;
    # the einsum path's causal blocks of 64 queries keep (64 + 128 + 192 + 256) / 4 = 160 keys a query
    assert einsum.activation_bytes - flash.activation_bytes == 4 * 8 * 256 * 4 * 4 * (3 * 160 - 1)
    remat = step_memory(tiny(4, 8, 256, remat="block"), p, flash=True)
    assert remat.activation_bytes == 4 * 8 * 256 * 64 * 4  # each block's float32 input
    assert remat.working_bytes > flash.working_bytes  # one block recomputed
    bf16 = step_memory(tiny(4, 8, 256, dtype="bfloat16"), p, flash=True)
    assert bf16.activation_bytes < flash.activation_bytes
    assert BYTES["bfloat16"] * 2 == BYTES["float32"]
    # parameters, gradients, two Adam moments; the gradient sum only when the batch is split
    assert (flash.parameter_bytes, flash.gradient_bytes, flash.optimizer_state_bytes,
            flash.accumulator_bytes) == (4 * p, 4 * p, 8 * p, 0)
    assert step_memory(tiny(4, 8, 256, grad_accum=2), p, flash=True).accumulator_bytes == 4 * p


def test_plan_prints_the_compiler_and_the_analytic_estimates(capsys):
    args = ["--preset", "cpu-tiny", "--set", "arch=decoder_only", "--set", "vocab_size=40",
            "--device-memory", "1e9", "--remat", "none"]
    assert plan.main(args) == 0
    text = capsys.readouterr().out
    assert "  needed  " in text and "  analytic  " in text and "with flash" in text
    assert plan.main([*args, "--json"]) == 0

    r = json.loads(capsys.readouterr().out)
    einsum, flash = r["analytic"]["einsum"], r["analytic"]["flash"]
    assert einsum["parameter_bytes"] == r["parameter_bytes"]
    assert 0 < flash["activation_bytes"] < einsum["activation_bytes"]
    assert einsum["total_bytes"] == sum(v for k, v in einsum.items() if k != "total_bytes")


@pytest.mark.parametrize("preset", list(GPU_DEVICES))
def test_gpu_presets_are_bfloat16_and_fit_their_device_with_the_margin(preset):
    cfg, _ = plan.sized_for_vocabulary(build_run_config(preset), vocab_explicit=False)
    memory, margin = GPU_DEVICES[preset]
    count = plan.parameter_count(cfg)
    assert cfg.model.dtype == "bfloat16"
    assert step_memory(cfg, count, flash=True).total_bytes <= (1 - margin) * memory
    assert choose_microbatch(cfg, count, memory, margin) == (cfg.model.remat, cfg.train.grad_accum)


def test_choose_microbatch_prefers_no_remat_then_block_then_refuses():
    cfg = tiny(4, 8, 256, dtype="bfloat16")
    p = 10_000
    whole = step_memory(cfg, p, flash=True).total_bytes
    # just above and just below the whole batch's need (the rounding of (1 - 0.1) / 0.9 is ~1e-16)
    assert choose_microbatch(cfg, p, whole / 0.9 * (1 + 1e-9), 0.1) == ("none", 1)
    assert choose_microbatch(cfg, p, whole / 0.9 * (1 - 1e-9), 0.1) == ("none", 2)
    block = step_memory(tiny(4, 8, 256, dtype="bfloat16", remat="block", grad_accum=8), p,
                        flash=True).total_bytes
    none_one = step_memory(tiny(4, 8, 256, dtype="bfloat16", grad_accum=8), p, flash=True).total_bytes
    assert block < none_one
    assert choose_microbatch(cfg, p, none_one - 1, 0.0)[0] == "block"
    assert choose_microbatch(cfg, p, 1.0, 0.1) is None
