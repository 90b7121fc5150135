"""`python -m experiments.doctor --full`: does training work here, how fast, how much memory.

Per framework and model (`gpu-small` and a ~124M decoder-only model on an accelerator; tiny
shapes and a few steps on the CPU): tokens/s and MFU in the compute dtype, the analytic peak
(`tnt.memory`, flash attention on an accelerator, einsum on the CPU) beside the measured peak
(`Backend.peak_memory_bytes`, None on the CPU), and remat's measured saving. Each framework runs
remat block first, then none: the peak only grows, so the second reading minus the first is the
memory remat saves. On the CPU, which has no device-memory counter, only remat none runs: the
block run would give no reading.
"""

from __future__ import annotations

import dataclasses
import math

from experiments import bench
from tnt.backend import backend
from tnt.config import RunConfig, build_run_config
from tnt.memory import step_memory
from tnt.params import param_specs

# a GPT-2-small-shaped decoder (12 x 768, 12 heads) at context 1024
DECODER_124M = {"arch": "decoder_only", "d_model": 768, "n_heads": 12, "n_decoder_layers": 12,
                "seq_len": 1024, "max_len_decoder": 1024, "batch_size": 16, "grad_accum": 1,
                "dtype": "bfloat16"}
CPU_MATMUL = 1024  # the CPU's peak matmul side: a smoke check there, 1/8 of the 2048 default's work
TINY = {"d_model": 64, "n_heads": 2, "n_decoder_layers": 2, "n_encoder_layers": 1, "seq_len": 32,
        "batch_size": 4, "grad_accum": 1, "vocab_size": 40}


def cases(accelerator: bool) -> dict[str, RunConfig]:
    """The models the check trains: full size on an accelerator, tiny shapes on the CPU."""
    if accelerator:
        return {"gpu-small": build_run_config("gpu-small", sets=["vocab_size=259"]),
                "decoder-124m": build_run_config("cpu", sets=_sets({**DECODER_124M,
                                                                    "vocab_size": 50304}))}
    return {"gpu-small": build_run_config("gpu-small", sets=_sets({**TINY, "max_steps": 3})),
            "decoder-124m": build_run_config("cpu", sets=_sets({**DECODER_124M, **TINY}))}


def _sets(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def with_remat(cfg: RunConfig, remat: str) -> RunConfig:
    return RunConfig(dataclasses.replace(cfg.model, remat=remat), cfg.train)


def check(name: str, steps: int) -> list[dict]:
    """Speed and memory of every case in backend `name`."""
    framework = backend(name)
    on_accelerator = framework.accelerator()
    peak = bench.matmul_peak(name, 0 if on_accelerator else CPU_MATMUL)
    rows = []
    for case, cfg in cases(on_accelerator).items():
        count = sum(math.prod(s.shape) for s in param_specs(cfg.model).values())
        measured = {}
        for remat in ("block", "none") if on_accelerator else ("none",):
            run_cfg = with_remat(cfg, remat)
            [timing] = bench.time_steps([run_cfg], name, steps, warmup=1)
            measured[remat] = (timing, framework.peak_memory_bytes())
        timing, peak_bytes = measured["none"]
        r = bench.report(cfg, name, timing, peak, peak_bytes or 0)
        predicted = step_memory(with_remat(cfg, "none"), count, flash=on_accelerator).total_bytes
        block_peak = measured["block"][1] if on_accelerator else None
        rows.append({"case": case, "framework": name, "device": peak["device"],
                     "dtype": cfg.model.dtype, "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
                     "mfu_peak": r["mfu_peak"], "predicted_peak_bytes": predicted,
                     "measured_peak_bytes": peak_bytes,
                     "remat_saving_bytes": (None if peak_bytes is None or block_peak is None
                                            else peak_bytes - block_peak)})
    return rows


def describe(row: dict) -> str:
    """One line of the acceptance table."""
    def gb(n: int | None) -> str:
        return "n/a" if n is None else f"{n / 1e9:.2f} GB"

    return (f"{row['framework']:<5} {row['case']:<13} {row['dtype']:<8} "
            f"{row['tokens_per_s']:>10.0f} tokens/s  MFU {row['mfu']:.3f} ({row['mfu_peak']})  "
            f"peak {gb(row['measured_peak_bytes'])} measured, {gb(row['predicted_peak_bytes'])} "
            f"predicted  remat saves {gb(row['remat_saving_bytes'])}")
