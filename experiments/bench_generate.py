"""`python -m experiments.bench generate`: tokens/s of KV-cached and uncached decoding.

Builds the model of a preset (random init, `--set` overrides) or loads `--ckpt`, makes a random
prompt of `--prompt-len` ids, and times `generate` making exactly `--new-tokens` tokens per row
(eos does not stop it) with the caches (`use_cache=True`) and with the whole model recomputed for
every token (`use_cache=False`, the baseline). Each mode runs once untimed first (JAX
compiles there); the report is the median of `--repeats` timed runs, as one JSON object:

    python -m experiments.bench generate --backend jax          # cpu preset, 256 new tokens
    python -m experiments.bench generate --backend all

torch runs with one intra-op thread on the CPU unless `--threads` says otherwise: one token at a
time is a chain of small ops, and on a busy machine torch's spinning worker threads cost more
than they give (measured here: 28 vs 1760 cached tokens/s with 2 threads vs 1 on 2 shared cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tnt.backend import BACKENDS, Backend, backend
from tnt.config import PRESETS, ConfigError, build_run_config
from tnt.generation import Sampling
from tnt.tokenizer import FIRST_ID


def model_flags(g) -> None:
    """The model a decoding benchmark times: a backend (or all), a preset refined by flags, or a
    trained checkpoint."""
    g.add_argument("--backend", choices=[*BACKENDS, "all"], default="jax")
    g.add_argument("--preset", choices=list(PRESETS), default="cpu")
    g.add_argument("--arch", choices=["encoder_decoder", "decoder_only"])
    g.add_argument("--norm", choices=["ngpt", "rmsnorm"])
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field (repeatable)")
    g.add_argument("--ckpt", help="time a trained checkpoint instead of a random-init model")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="time cached vs uncached decoding (prints JSON)")
    model_flags(g)
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument("--prompt-len", type=int, default=32,
                   help="prompt ids (the encoder's for encoder_decoder); a decoder_only prompt "
                        "is cut to fit with the new tokens")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    g.add_argument("--uncached-repeats", type=int, default=1)
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on the CPU (default 1; 0: torch's default)")
    g.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")


def _model(framework: Backend, args: argparse.Namespace):
    if args.ckpt:
        return framework.load(args.ckpt).model
    cfg = build_run_config(args.preset, {"arch": args.arch, "norm": args.norm}, args.set).model
    return framework.init_model(cfg)


def bench_backend(name: str, args: argparse.Namespace) -> dict:
    framework = backend(name)
    threads = framework.decode_threads(args.threads)
    model = _model(framework, args)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = [rng.integers(FIRST_ID, cfg.vocab_size, args.prompt_len)
               for _ in range(args.batch_size)]
    run = lambda cache: framework.generate(model, prompts, args.new_tokens, Sampling(),  # noqa: E731
                                 use_cache=cache, warn=False, stop_at_eos=False)
    result = {"backend": name, "arch": cfg.arch, "norm": cfg.norm, "device": framework.device_name(),
              "d_model": cfg.d_model, "n_decoder_layers": cfg.n_decoder_layers,
              "batch_size": args.batch_size, "torch_threads": threads}
    for mode, cache, repeats in (("cached", True, args.repeats),
                                 ("uncached", False, args.uncached_repeats)):
        t0 = time.perf_counter()
        first = run(cache)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run(cache)
            times.append(time.perf_counter() - t0)
        made = sum(len(t) for t in out.tokens)
        seconds = statistics.median(times)
        result[mode] = {"seconds": seconds, "tokens_per_s": made / seconds,
                        "first_run_s": first_s, "repeats": repeats}
        result["new_tokens"] = len(first.tokens[0])
        result["notices"] = first.notices
    result["prompt_tokens"] = (args.prompt_len if cfg.has_encoder else
                               min(args.prompt_len, cfg.max_len_decoder - result["new_tokens"] + 1))
    result["speedup"] = result["cached"]["tokens_per_s"] / result["uncached"]["tokens_per_s"]
    return result


def bench_generate(args: argparse.Namespace) -> dict:
    if args.new_tokens < 1 or args.prompt_len < 0 or args.batch_size < 1 or args.repeats < 1 \
            or args.uncached_repeats < 1:
        raise ConfigError("--new-tokens, --batch-size, --repeats and --uncached-repeats must be "
                          ">= 1 and --prompt-len >= 0")
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    results = [bench_backend(b, args) for b in backends]
    return results[0] if len(results) == 1 else {"runs": {r["backend"]: r for r in results}}
