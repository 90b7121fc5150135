"""Benchmark the train step: `python -m experiments.bench train --backend jax --json`.
(`python -m experiments.bench generate` times decoding: see `experiments/bench_generate.py`;
`python -m experiments.bench harness` the lm-eval model's loglikelihood requests:
`experiments/bench_harness.py`.)

Builds the run config exactly as `experiments.pretrain` does (preset, flags, `--set`), builds the
backend's `Trainer` by name (`tnt.backend.backend(name).trainer(cfg)`), feeds it synthetic
batches of random token ids and times the step after compilation and warmup. Every step is
waited for by reading the loss.

Reported: median step time, tokens/s, model FLOPs per token (`tnt.flops`), achieved FLOP/s, the
peak FLOP/s of a large fp32 matmul measured in the same framework and process, MFU, and peak
memory (device memory on a GPU, the process's max RSS on the CPU). MFU is achieved FLOP/s over the
datasheet peak of the accelerator in the compute dtype (`tnt.flops.datasheet_peak`) when the run
is on an accelerator the table knows, else over the measured matmul peak (the CPU); `mfu_peak`
says which. `--dtype`, `--set remat=block` and `--set grad_accum=N` are config fields like any
other (`grad_accum` splits the same global batch: tokens per step do not change).

`--compare-norms` builds an nGPT and an RMSNorm backend of the same shape in one process and
alternates their steps, so machine noise hits both alike; it reports ngpt/rmsnorm step time.

    python -m experiments.bench train --arch decoder_only --set d_model=256 --set n_heads=4 \\
        --set n_decoder_layers=4 --seq-len 256 --batch-size 8 --set vocab_size=320 \\
        --set max_len_decoder=256 --compare-norms --json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np

from experiments import bench_generate, bench_harness
from experiments.flags import Parser, add_threads_flag, apply_threads
from tnt.backend import BACKENDS, BackendUnavailable, backend
from tnt.config import DTYPES, PRESETS, ConfigError, RunConfig, build_run_config
from tnt.flops import datasheet_peak, flops_per_token
from tnt.run import batch_spec, tokens_per_step
from tnt.tokenizer import FIRST_ID

N_BATCHES = 4  # distinct synthetic batches, cycled


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.bench", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="time the train step")
    train.add_argument("--backend", choices=BACKENDS, default="jax")
    train.add_argument("--preset", choices=list(PRESETS), default="cpu")
    train.add_argument("--arch", choices=["encoder_decoder", "decoder_only"])
    train.add_argument("--norm", choices=["ngpt", "rmsnorm"])
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seq-len", type=int)
    train.add_argument("--dtype", choices=list(DTYPES),
                       help="compute dtype (default float32; parameters stay float32)")
    train.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    train.add_argument("--warmup", type=int, default=3,
                       help="untimed steps after the compiling one (default 3)")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override any config field, e.g. --set d_model=256 (repeatable)")
    train.add_argument("--compare-norms", action="store_true",
                       help="time ngpt and rmsnorm in one process, report the step-time ratio")
    train.add_argument("--matmul-size", type=int, default=0,
                       help="side of the square fp32 matmul for the peak (default 2048 on a "
                            "CPU, 8192 on a GPU)")
    train.add_argument("--json", action="store_true", help="print one JSON object")
    add_threads_flag(train)
    bench_generate.add_parser(sub)
    bench_harness.add_parser(sub)
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, norm: str | None = None) -> RunConfig:
    overrides = {"arch": args.arch, "norm": norm or args.norm, "batch_size": args.batch_size,
                 "seq_len": args.seq_len, "dtype": args.dtype}
    return build_run_config(args.preset, overrides, args.set)


def synthetic_batches(cfg: RunConfig, n: int = N_BATCHES, seed: int = 0) -> list[dict]:
    """`n` batches of random windows, ids in [3, vocab): no padding, every label counts."""
    t, m = cfg.train, cfg.model
    spec = batch_spec(cfg)
    rng = np.random.default_rng(seed)
    return [spec.make(rng.integers(FIRST_ID, m.vocab_size, (t.batch_size, spec.window)))
            for _ in range(n)]


def matmul_peak(name: str, n: int = 0, repeats: int = 5) -> dict:
    """FLOP/s of the best of `repeats` square fp32 matmuls (default precision) in backend `name`."""
    framework = backend(name)
    on_accelerator = framework.accelerator()
    n = n or (8192 if on_accelerator else 2048)
    seconds = framework.matmul_seconds(n, repeats)
    return {"matmul_size": n, "matmul_peak_flops_per_s": 2 * n**3 / seconds,
            "device": framework.device_name(),
            "accelerator": on_accelerator}


def peak_memory_bytes(name: str) -> int:
    """Peak device memory on an accelerator; on the CPU the process's max resident set size."""
    peak = backend(name).peak_memory_bytes()
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# --- timing -------------------------------------------------------------------------------------

def time_steps(cfgs: list[RunConfig], name: str, steps: int, warmup: int) -> list[dict]:
    """Build one trainer of backend `name` per config, compile and warm each, then alternate
    their timed steps."""
    framework = backend(name)
    runs = []
    for cfg in cfgs:
        b, batches = framework.trainer(cfg), synthetic_batches(cfg)
        t0 = time.perf_counter()
        float(b.step(batches[0])["loss"])
        compile_s = time.perf_counter() - t0
        for i in range(warmup):
            float(b.step(batches[(i + 1) % len(batches)])["loss"])
        runs.append({"backend": b, "batches": batches, "compile_s": compile_s, "times": []})
    for i in range(steps):
        for run in runs:
            batch = run["batches"][i % len(run["batches"])]
            t0 = time.perf_counter()
            loss = float(run["backend"].step(batch)["loss"])
            run["times"].append(time.perf_counter() - t0)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at timed step {i}")
    return [{"compile_s": r["compile_s"], "times": r["times"]} for r in runs]


def report(cfg: RunConfig, backend: str, timing: dict, peak: dict, memory: int) -> dict:
    m, t = cfg.model, cfg.train
    step_time = statistics.median(timing["times"])
    n_tokens = tokens_per_step(cfg)
    fpt = flops_per_token(m, t.encoder_len, t.seq_len)
    achieved = fpt * n_tokens / step_time
    datasheet = datasheet_peak(peak["device"], m.dtype) if peak["accelerator"] else None
    return {
        "backend": backend, "arch": m.arch, "norm": m.norm, "device": peak["device"],
        "config": {"d_model": m.d_model, "n_heads": m.n_heads,
                   "n_encoder_layers": m.n_encoder_layers if m.has_encoder else 0,
                   "n_decoder_layers": m.n_decoder_layers, "mlp_hidden": m.hidden,
                   "vocab_size": m.vocab_size, "activation": m.activation,
                   "dtype": m.dtype, "remat": m.remat, "grad_accum": t.grad_accum,
                   "batch_size": t.batch_size, "seq_len": t.seq_len,
                   "enc_len": t.encoder_len if m.has_encoder else 0},
        "steps": len(timing["times"]), "compile_s": timing["compile_s"],
        "tokens_per_step": n_tokens,
        "step_time_s": step_time, "step_time_min_s": min(timing["times"]),
        "tokens_per_s": n_tokens / step_time,
        "peak_memory_bytes": memory,
        "flops_per_token": fpt,
        "achieved_flops_per_s": achieved,
        "matmul_size": peak["matmul_size"],
        "matmul_peak_flops_per_s": peak["matmul_peak_flops_per_s"],
        "datasheet_peak_flops_per_s": datasheet,
        "mfu": achieved / (datasheet or peak["matmul_peak_flops_per_s"]),
        "mfu_peak": f"datasheet {m.dtype}" if datasheet else "measured fp32 matmul",
    }


def bench_train(args: argparse.Namespace) -> dict:
    norms = ["ngpt", "rmsnorm"] if args.compare_norms else [None]
    cfgs = [run_config(args, norm) for norm in norms]
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, "
                          f"{args.warmup}")
    timings = time_steps(cfgs, args.backend, args.steps, args.warmup)
    peak = matmul_peak(args.backend, args.matmul_size)
    memory = peak_memory_bytes(args.backend)
    reports = [report(c, args.backend, tm, peak, memory) for c, tm in
               zip(cfgs, timings, strict=True)]
    if not args.compare_norms:
        return reports[0]
    by_norm = {r["norm"]: r for r in reports}
    return {"backend": args.backend, "runs": by_norm,
            "ngpt_over_rmsnorm_step_time": (by_norm["ngpt"]["step_time_s"]
                                            / by_norm["rmsnorm"]["step_time_s"])}


def describe(r: dict) -> str:
    c = r["config"]
    peak = r["datasheet_peak_flops_per_s"] or r["matmul_peak_flops_per_s"]
    return (f"{r['backend']} {r['arch']} {r['norm']} d{c['d_model']} L{c['n_decoder_layers']} "
            f"B{c['batch_size']}x{c['seq_len']} {c['dtype']} remat {c['remat']} grad_accum "
            f"{c['grad_accum']}: {r['step_time_s'] * 1e3:.1f} ms/step, "
            f"{r['tokens_per_s']:,.0f} tok/s, {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"of {peak / 1e9:.1f} ({r['mfu_peak']}; MFU {r['mfu']:.1%}), peak memory "
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "generate":  # tokens/s of cached vs uncached decoding, always JSON
            print(json.dumps(bench_generate.bench_generate(args), indent=1))
            return 0
        if args.command == "harness":  # loglikelihood requests/s at each batch size, always JSON
            print(json.dumps(bench_harness.bench_harness(args), indent=1))
            return 0
        apply_threads(args)
        result = bench_train(args)
    except (ConfigError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    elif "runs" in result:
        for r in result["runs"].values():
            print(describe(r))
        print(f"ngpt / rmsnorm step time: {result['ngpt_over_rmsnorm_step_time']:.3f}")
    else:
        print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
