"""`python -m experiments.bench harness`: loglikelihood requests per second of the harness model.

Builds the model of a preset (random init, `--set` overrides) or loads `--ckpt`, makes `--requests`
random (context, continuation) token requests shaped like a multiple-choice task (contexts of
`--context-len` ids give or take half, continuations of 1 to `--continuation-len`), and times
`tnt.harness.loglikelihoods` (what the lm-eval model `tnt` runs for each task's loglikelihood
requests, without lm-eval's own bookkeeping) at each of `--batch-sizes`. Each size runs once
untimed first (JAX compiles there); the report is the median of `--repeats` timed runs, as one
JSON object, with `batching_speedup`: requests/s at the largest size over the smallest.

    python -m experiments.bench harness --backend all --batch-sizes 1,16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from experiments.bench_generate import model_flags
from tnt import harness
from tnt.backend import BACKENDS, Backend, backend
from tnt.config import ConfigError, build_run_config
from tnt.tokenizer import FIRST_ID


def add_parser(sub) -> None:
    g = sub.add_parser("harness", help="time the harness model's loglikelihood requests (prints JSON)")
    model_flags(g)
    g.add_argument("--requests", type=int, default=128)
    g.add_argument("--context-len", type=int, default=48, help="mean context ids (48)")
    g.add_argument("--continuation-len", type=int, default=8, help="longest continuation (8)")
    g.add_argument("--batch-sizes", default="1,16", help="comma list of requests per model call")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads on the CPU (0: torch's default)")
    g.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")


def requests(args: argparse.Namespace, vocab_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    lo, hi = max(1, args.context_len // 2), max(2, args.context_len * 3 // 2)
    return [(rng.integers(FIRST_ID, vocab_size, rng.integers(lo, hi)),
             rng.integers(FIRST_ID, vocab_size, rng.integers(1, args.continuation_len + 1)))
            for _ in range(args.requests)]


def _model(framework: Backend, args: argparse.Namespace):
    if args.ckpt:
        return framework.load(args.ckpt).model
    cfg = build_run_config(args.preset, {"arch": args.arch, "norm": args.norm}, args.set).model
    return framework.init_model(cfg)


def bench_backend(name: str, args: argparse.Namespace, sizes: list[int]) -> dict:
    framework = backend(name)
    threads = framework.decode_threads(args.threads) if args.threads else None
    model = _model(framework, args)
    cfg = model.cfg
    reqs = requests(args, cfg.vocab_size)
    score = lambda batch: framework.label_logprobs(model, batch)  # noqa: E731
    result = {"backend": name, "arch": cfg.arch, "norm": cfg.norm, "device": framework.device_name(),
              "d_model": cfg.d_model, "n_decoder_layers": cfg.n_decoder_layers,
              "max_len_decoder": cfg.max_len_decoder, "requests": len(reqs),
              "scored_tokens": int(sum(len(c) for _, c in reqs)), "torch_threads": threads,
              "batch_sizes": {}}
    for size in sizes:
        t0 = time.perf_counter()
        first = harness.loglikelihoods(score, cfg, reqs, size)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            again = harness.loglikelihoods(score, cfg, reqs, size)
            times.append(time.perf_counter() - t0)
        if again != first:
            raise RuntimeError(f"batch size {size}: repeated runs scored differently")
        seconds = statistics.median(times)
        result["batch_sizes"][str(size)] = {"seconds": seconds, "requests_per_s": len(reqs) / seconds,
                                            "first_run_s": first_s, "repeats": args.repeats}
    rates = [result["batch_sizes"][str(s)]["requests_per_s"] for s in (min(sizes), max(sizes))]
    result["batching_speedup"] = rates[1] / rates[0]
    return result


def bench_harness(args: argparse.Namespace) -> dict:
    try:
        sizes = sorted({int(s) for s in args.batch_sizes.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"--batch-sizes must be a comma list of integers, "
                          f"got {args.batch_sizes!r}") from None
    if not sizes or sizes[0] < 1 or args.requests < 1 or args.repeats < 1 or args.context_len < 1 \
            or args.continuation_len < 1:
        raise ConfigError("--batch-sizes, --requests, --repeats, --context-len and --continuation-len "
                          "must be >= 1")
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    results = [bench_backend(b, args, sizes) for b in backends]
    return results[0] if len(results) == 1 else {"runs": {r["backend"]: r for r in results}}
