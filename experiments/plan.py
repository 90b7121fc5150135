"""Will a run fit? `python -m experiments.plan --preset ngpt-1b --device-memory 141e9 [--json]`.

The model is sized for the vocabulary the run would use, as `experiments.pretrain` sizes it:
`--tokenizer byte` (259 ids, the default), a tokenizer.json (its ids, plus an appended pad if it
has none), `bpe` (at most `bpe_vocab_size`), or an explicit `--set vocab_size=N`; the parameter
count printed is that model's (the embeddings and the lm_head grow with the vocabulary).

Lowers and compiles the real JAX train step (`tnt_jax.train.make_train_step`: forward, backward,
gradient accumulation, clip, Adam, eigen LRs, projection) for abstract inputs: the model is built
with `nnx.eval_shape`, the state and the batch are `jax.ShapeDtypeStruct`s, and
`jax.jit(...).lower(...).compile()` allocates nothing. From XLA's `memory_analysis()` it reports
the bytes of the arguments, outputs (aliased with the donated state) and temporaries, and from
`cost_analysis()` the FLOPs; the parameter and optimizer-state bytes are summed from the abstract
trees themselves.

The memory a step needs is `arguments + outputs - aliased + temporaries`. The compiler is the
one of the machine the planner runs on, usually XLA:CPU: its temporaries are a proxy for a GPU's
(the GPU compiler fuses and schedules differently, and on a GPU the attention may run as a cuDNN
kernel without materialized scores), not equal to them. Leave headroom.

The largest microbatch that fits is found per remat setting from two compiles (microbatches of 1
and 2 sequences, one microbatch per step): the temporaries grow linearly with the microbatch, and
accumulating over several microbatches adds one float32 copy of the parameters (the gradient
sum). XLA counts a loop's body once in `cost_analysis()`, so the FLOPs per step are also
extrapolated from those two compiles (per sequence times the global batch, plus the update).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

from experiments.flags import Parser
from tnt.config import PRESETS, REMATS, ConfigError, RunConfig, build_run_config, parse_set
from tnt.data import DataError, make_tokenizer
from tnt.memory import step_memory
from tnt.params import param_specs
from tnt.special_ids import tokenizer_special_ids


def human(n: float) -> str:
    """Bytes in GB, MB or kB, whichever reads best."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def parameter_count(cfg: RunConfig) -> int:
    """The number of parameters of `cfg`'s model (every entry of the shared table)."""
    return sum(math.prod(spec.shape) for spec in param_specs(cfg.model).values())


def sized_for_vocabulary(cfg: RunConfig, vocab_explicit: bool) -> tuple[RunConfig, str]:
    """(`cfg` with the vocabulary size and special ids of its tokenizer, as a training run takes
    them; a description of that vocabulary). A trained BPE's size is only known after training:
    `bpe_vocab_size` is its upper bound."""
    name = cfg.train.tokenizer
    if vocab_explicit:
        return cfg, f"vocab_size={cfg.model.vocab_size} as set"
    if name == "bpe":
        model = dataclasses.replace(cfg.model, vocab_size=cfg.train.bpe_vocab_size)
        return dataclasses.replace(cfg, model=model), "a BPE of at most bpe_vocab_size ids"
    vocab, ids = tokenizer_special_ids(make_tokenizer(name, [], cfg.train.bpe_vocab_size))
    model = dataclasses.replace(cfg.model, vocab_size=vocab, **ids)
    what = "the byte tokenizer" if name == "byte" else f"tokenizer {name}"
    return dataclasses.replace(cfg, model=model), what


def abstract_step(cfg: RunConfig):
    """(train step, abstract state, abstract batch, parameter bytes, optimizer-state bytes)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tnt_jax.model import TnT
    from tnt_jax.optim import build_optimizer
    from tnt_jax.train import TrainState, make_train_step

    model = nnx.eval_shape(lambda: TnT(cfg.model, nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    params = {".".join(map(str, path)): jax.ShapeDtypeStruct(v.shape, v.dtype)
              for path, v in nnx.to_flat_state(state)}
    tx = build_optimizer(cfg.model, cfg.train)
    opt_state = jax.eval_shape(tx.init, params)
    abstract = TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32))
    t = cfg.train
    batch = {"dec_tokens": jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32),
             "labels": jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32)}
    if cfg.model.has_encoder:
        batch["enc_tokens"] = jax.ShapeDtypeStruct((t.batch_size, t.encoder_len), jnp.int32)
    step = make_train_step(graphdef, tx, t.grad_accum)
    return step, abstract, batch, tree_bytes(params), tree_bytes(opt_state)


def tree_bytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Progress:
    """One stderr line per compile as it starts and ends (a large model's takes minutes); silent
    without a stream. stdout stays the plan alone (`--json`)."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done, self.stream = total, 0, stream

    def start(self, what: str) -> float:
        self.done += 1
        self._say(f"compiling {self.done}/{self.total}: {what} ...")
        return time.perf_counter()

    def end(self, began: float) -> None:
        self._say(f"compiled {self.done}/{self.total} in {time.perf_counter() - began:.1f} s")

    def _say(self, line: str) -> None:
        if self.stream is not None:
            print(line, file=self.stream, flush=True)


def compile_step(cfg: RunConfig, progress: Progress | None = None) -> dict:
    """Memory and FLOPs of the compiled train step of `cfg`, for abstract inputs."""
    t = cfg.train
    began = progress.start(f"train step, microbatch {t.batch_size // t.grad_accum} x "
                           f"{t.grad_accum}, remat {cfg.model.remat}") if progress else 0.0
    step, state, batch, param_bytes, opt_bytes = abstract_step(cfg)
    compiled = step.lower(state, batch).compile()
    if progress:
        progress.end(began)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {"parameter_bytes": param_bytes, "optimizer_state_bytes": opt_bytes,
           "argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes),
           "aliased_bytes": int(mem.alias_size_in_bytes),
           "temporary_bytes": int(mem.temp_size_in_bytes),
           "compiled_flops": float(cost.get("flops", 0.0))}
    out["needed_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["aliased_bytes"]
                           + out["temporary_bytes"])
    return out


def with_microbatch(cfg: RunConfig, rows: int, remat: str) -> RunConfig:
    """`cfg` with one microbatch of `rows` sequences per step, at `remat`."""
    return RunConfig(dataclasses.replace(cfg.model, remat=remat),
                     dataclasses.replace(cfg.train, batch_size=rows, grad_accum=1))


def fit_microbatch(cfg: RunConfig, remat: str, device_memory: float,
                   progress: Progress | None = None) -> dict:
    """The largest microbatch (a divisor of batch_size) whose step fits, from a linear fit of
    the needed bytes over microbatches of 1 and 2 sequences; also the FLOPs per global step."""
    one, two = (compile_step(with_microbatch(cfg, rows, remat), progress) for rows in (1, 2))
    per_row = two["needed_bytes"] - one["needed_bytes"]
    fixed = one["needed_bytes"] - per_row
    accumulator = one["parameter_bytes"]
    flops_row = two["compiled_flops"] - one["compiled_flops"]
    batch = cfg.train.batch_size
    best = largest_microbatch(fixed, per_row, accumulator, batch, device_memory)
    needed = fixed + per_row * max(best, 1) + (accumulator if max(best, 1) < batch else 0)
    return {"remat": remat, "bytes_per_sequence": per_row, "fixed_bytes": fixed,
            "largest_microbatch": best, "grad_accum": batch // best if best else None,
            "needed_bytes": needed,
            "flops_per_step": flops_row * batch + (one["compiled_flops"] - flops_row)}


def largest_microbatch(fixed: int, per_row: int, accumulator: int, batch: int,
                       device_memory: float) -> int:
    """The largest divisor of `batch` whose step fits (0 if none): `fixed + per_row * rows`, plus
    the float32 gradient sum when the batch is split."""
    def needed(rows: int) -> int:
        return fixed + per_row * rows + (accumulator if rows < batch else 0)

    fitting = [r for r in range(1, batch + 1) if batch % r == 0 and needed(r) <= device_memory]
    return max(fitting, default=0)


def plan(cfg: RunConfig, device_memory: float, remats: tuple[str, ...] = REMATS,
         vocabulary: str = "as configured", progress_stream=None) -> dict:
    """The compiled step of `cfg` as given; raises `DoesNotFit` when it needs more than
    `device_memory`; else adds the largest microbatch per remat setting. `vocabulary` says where
    the model's vocabulary size comes from; each compile is announced on `progress_stream`."""
    progress = Progress(1 + 2 * len(remats), progress_stream)
    step = compile_step(cfg, progress)
    m, t = cfg.model, cfg.train
    result = {"config": {"arch": m.arch, "d_model": m.d_model, "n_heads": m.n_heads,
                         "n_encoder_layers": m.n_encoder_layers if m.has_encoder else 0,
                         "n_decoder_layers": m.n_decoder_layers, "vocab_size": m.vocab_size,
                         "dtype": m.dtype, "remat": m.remat, "batch_size": t.batch_size,
                         "grad_accum": t.grad_accum, "seq_len": t.seq_len,
                         "enc_len": t.encoder_len if m.has_encoder else 0},
              "vocabulary": vocabulary, "parameter_count": parameter_count(cfg),
              "device_memory_bytes": device_memory, "compiler": compiler(), **step,
              "fits": step["needed_bytes"] <= device_memory}
    result["analytic"] = analytic(cfg, result["parameter_count"])
    if not result["fits"]:
        raise DoesNotFit(result)
    result["microbatch"] = [fit_microbatch(cfg, r, device_memory, progress) for r in remats]
    return result


def analytic(cfg: RunConfig, parameters: int) -> dict:
    """tnt.memory's count of the step as configured, with the einsum attention the compiler here
    traces and with a fused (flash) kernel as on a GPU."""
    out = {}
    for name, flash in (("einsum", False), ("flash", True)):
        m = step_memory(cfg, parameters, flash)
        out[name] = {**dataclasses.asdict(m), "total_bytes": m.total_bytes}
    return out


class DoesNotFit(Exception):
    def __init__(self, result: dict) -> None:
        c = result["config"]
        super().__init__(
            f"the train step needs {human(result['needed_bytes'])} "
            f"(parameters {human(result['parameter_bytes'])}, optimizer state "
            f"{human(result['optimizer_state_bytes'])}, temporaries "
            f"{human(result['temporary_bytes'])}) but the device has "
            f"{human(result['device_memory_bytes'])}; use a smaller microbatch "
            f"(batch_size={c['batch_size']} over grad_accum={c['grad_accum']}: raise --set "
            f"grad_accum=...) or --set remat=block")


def compiler() -> str:
    import jax

    return f"XLA:{jax.default_backend().upper()} (jax {jax.__version__})"


def describe(name: str, r: dict) -> str:
    c = r["config"]
    micro = c["batch_size"] // c["grad_accum"]
    lines = [
        f"{name}: {c['arch']} d{c['d_model']} L{c['n_decoder_layers']} H{c['n_heads']} "
        f"V{c['vocab_size']}, batch {c['batch_size']} x {c['seq_len']} tokens (grad_accum "
        f"{c['grad_accum']}: microbatch {micro}), {c['dtype']}, remat {c['remat']}",
        f"  {r['parameter_count'] / 1e6:.1f}M parameters with {c['vocab_size']} vocabulary ids "
        f"({r['vocabulary']})",
        f"  parameters        {human(r['parameter_bytes']):>10}",
        f"  optimizer state   {human(r['optimizer_state_bytes']):>10}",
        f"  temporaries       {human(r['temporary_bytes']):>10}",
        f"  needed            {human(r['needed_bytes']):>10} of "
        f"{human(r['device_memory_bytes'])}: fits",
        f"  analytic          {human(r['analytic']['einsum']['total_bytes']):>10} with einsum "
        f"attention, {human(r['analytic']['flash']['total_bytes'])} with flash (tnt.memory)",
    ]
    for fit in r["microbatch"]:
        best = fit["largest_microbatch"]
        where = (f"microbatch {best} (grad_accum {fit['grad_accum']}), needs "
                 f"{human(fit['needed_bytes'])}" if best else
                 f"nothing fits (one sequence needs {human(fit['needed_bytes'])})")
        lines.append(f"  remat {fit['remat']:<5}: {where}; "
                     f"{human(fit['bytes_per_sequence'])} per sequence, "
                     f"{fit['flops_per_step']:.3g} FLOPs per step")
    lines.append(f"  (temporaries from {r['compiler']}: a proxy for a GPU compiler's)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.plan", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--tokenizer", metavar="byte|bpe|PATH",
                   help="size the vocabulary as a run with this tokenizer would (default: the "
                        "config's, byte); --set vocab_size=N overrides it")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set grad_accum=16 (repeatable)")
    p.add_argument("--device-memory", type=float, default=141e9,
                   help="bytes of accelerator memory (default 141e9, one H200)")
    p.add_argument("--remat", choices=[*REMATS, "both"], default="both",
                   help="remat settings to search the largest microbatch for (default both)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.device_memory <= 0:
            raise ConfigError(f"--device-memory must be > 0, got {args.device_memory}")
        cfg = build_run_config(args.preset, {"tokenizer": args.tokenizer}, args.set)
        cfg, vocabulary = sized_for_vocabulary(
            cfg, any(parse_set(s)[0] == "vocab_size" for s in args.set))
        remats = REMATS if args.remat == "both" else (args.remat,)
        result = plan(cfg, args.device_memory, remats, vocabulary, progress_stream=sys.stderr)
    except (ConfigError, DataError, DoesNotFit) as e:
        print(f"error: preset {args.preset}: {e}" if isinstance(e, DoesNotFit) else f"error: {e}",
              file=sys.stderr)
        return 2
    print(json.dumps({"preset": args.preset, **result}, indent=1) if args.json
          else describe(args.preset, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
