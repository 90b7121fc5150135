"""Pretrain a TnT model: `python -m experiments.pretrain --backend jax` (no other argument needed).

The loop here is framework-neutral: data, progress bar, validation, TensorBoard, checkpoint
schedule and the end-of-run report. The backend (`tnt_jax.train.JaxBackend`, or the torch one)
owns the model, the optimizer, the compiled step and the checkpoint format.

Run directory: `RUN_DIR/config.json`, `RUN_DIR/tb/` (TensorBoard events),
`RUN_DIR/checkpoints/<step>/`, and `RUN_DIR/tokenizer.json` for a BPE run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from experiments import launch
from experiments.backends import BACKENDS, BackendUnavailable, backend_class
from experiments.dynamics import Dynamics
from tnt.checkpoint_meta import CheckpointError, config_differences
from tnt.config import PRESETS, ConfigError, RunConfig, build_run_config, parse_set
from tnt.data import Batches, BatchSpec, DataError, load_corpus
from tnt.params import param_specs
from tnt.schedule import learning_rate
from tnt.special_ids import tokenizer_special_ids
from tnt.tokenizer import BPETokenizer, tokenizer_from_spec

# Flags that map onto config fields (flag dest -> field).
FLAG_FIELDS = {"arch": "arch", "norm": "norm", "data": "data", "max_steps": "max_steps",
               "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "seed": "seed",
               "eval_every": "eval_every", "ckpt_every": "ckpt_every", "tokenizer": "tokenizer",
               "analysis_every": "analysis_every"}
# Train fields that may change when resuming; anything else must match the checkpoint.
RESUMABLE = {"max_steps", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
             "log_every", "analysis_every", "sample_tokens"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--arch", choices=["encoder_decoder", "decoder_only"])
    p.add_argument("--norm", choices=["ngpt", "rmsnorm"])
    p.add_argument("--data", help="stdlib (default), a text file or folder, or a prepared "
                                  "token folder (python -m experiments.prepare)")
    p.add_argument("--tokenizer", choices=["byte", "bpe"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--analysis-every", type=int, help="TensorBoard dynamics interval "
                   "(alphas, scalers, condition numbers; experiments/dynamics.py); 0 disables")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set d_model=256 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<backend>-<arch>-<norm>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint")
    launch.add_flags(p)
    return p.parse_args(argv)


def explicit_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {field: getattr(args, dest) for dest, field in FLAG_FIELDS.items()
            if getattr(args, dest) is not None}


def resume_config(saved: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The saved config with the explicitly given flags applied; refuse changes that break resume."""
    values = {**dataclasses.asdict(saved.model), **dataclasses.asdict(saved.train),
              **explicit_overrides(args)}
    cfg = build_run_config("cpu", values, args.set)
    diff = config_differences(cfg.model, saved.model) + [
        d for d in config_differences(cfg.train, saved.train) if d.split(":")[0] not in RESUMABLE]
    if diff:
        raise ConfigError("cannot resume with a different config: " + "; ".join(diff))
    return cfg


def fit_tokenizer(cfg: RunConfig, tokenizer, vocab_explicit: bool) -> RunConfig:
    """Take vocab size and special ids from the tokenizer (a larger explicit vocab is allowed;
    a tokenizer without a pad gets an appended pad id, docs/design.md "Special ids")."""
    vocab, ids = tokenizer_special_ids(tokenizer)
    if vocab_explicit and cfg.model.vocab_size < vocab:
        raise ConfigError(f"vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary of {vocab}")
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size if vocab_explicit
                                else vocab, **ids)
    return dataclasses.replace(cfg, model=model)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def batch_spec(cfg: RunConfig) -> BatchSpec:
    t = cfg.train
    return BatchSpec(cfg.model.arch, t.batch_size, t.seq_len, t.encoder_len, cfg.model.bos_id)


def tokens_per_step(cfg: RunConfig) -> int:
    """Input tokens one step processes (encoder + decoder for encoder_decoder)."""
    t = cfg.train
    return t.batch_size * (t.seq_len + (t.encoder_len if cfg.model.has_encoder else 0))


def prepare_run(args: argparse.Namespace):
    """Everything before the first step; raises ConfigError/DataError/CheckpointError early."""
    Backend = backend_class(args.backend)
    sets = dict(parse_set(s) for s in args.set)
    cfg = build_run_config(args.preset, explicit_overrides(args), args.set)
    out = Path(args.out or f"runs/{args.backend}-{cfg.model.arch}-{cfg.model.norm}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_dir = out / "checkpoints"
    meta = None
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        meta = Backend.read_meta(ckpt_dir)
        if meta["backend"] != args.backend:
            raise CheckpointError(f"{ckpt_dir} was written by the {meta['backend']} backend; "
                                  f"resume it with --backend {meta['backend']}")
        cfg = resume_config(RunConfig.from_dict(meta["config"]), args)
        corpus = load_corpus(cfg.train.data, tokenizer_from_spec(meta["tokenizer"]),
                             cfg.train.val_percent)
    else:
        if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            raise CheckpointError(f"{out} already holds checkpoints; pass --resume to continue "
                                  f"it or choose another --out (nothing was changed)")
        corpus = load_corpus(cfg.train.data, cfg.train.tokenizer, cfg.train.val_percent,
                             cfg.train.bpe_vocab_size)
        cfg = fit_tokenizer(cfg, corpus.tokenizer, "vocab_size" in sets)
    batches = Batches(batch_spec(cfg), corpus.train, corpus.val, cfg.train.seed)
    return Backend, cfg, out, ckpt_dir, meta, corpus, batches


def alpha_means(backend, names: list[str]) -> dict[str, float]:
    arrays = backend.arrays(names)
    return {n: float(np.mean(np.abs(a))) for n, a in arrays.items()}


def train(args: argparse.Namespace) -> float:
    role = launch.start(args)
    Backend, cfg, out, ckpt_dir, meta, corpus, batches = prepare_run(args)
    role.check(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if meta is None and role.main:
        write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
        if isinstance(corpus.tokenizer, BPETokenizer):
            corpus.tokenizer.save(out / "tokenizer.json")
    backend = Backend(cfg, **role.backend_kwargs)
    backend.open(ckpt_dir, cfg.train.keep_checkpoints)
    if meta is not None:
        backend.restore(ckpt_dir)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(out / "tb")) if role.main else launch.NullWriter()
    t, spec = cfg.train.resolved(cfg.model.norm), corpus.tokenizer.spec
    alphas = [n for n in param_specs(cfg.model) if n.endswith(".alpha")]
    dynamics = Dynamics(cfg.model) if t.analysis_every else None
    start = backend.step_count
    print(f"TnT pretrain: backend={args.backend} arch={cfg.model.arch} norm={cfg.model.norm} "
          f"d_model={cfg.model.d_model} steps {start}->{t.max_steps} run dir {out}", flush=True)
    val_loss = float("nan")
    bar = tqdm(total=t.max_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0,
               disable=not role.main)
    tick, tick_step = time.perf_counter(), start
    began = None  # wall clock for val/elapsed_sec, from the end of the first (compiling) step
    for step in range(start, t.max_steps):
        metrics = backend.step(batches.train_batch(step, backend.rows))
        began = began or time.perf_counter()
        done = step + 1
        if done % t.log_every == 0 or done == t.max_steps:
            loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
            now = time.perf_counter()
            tps = tokens_per_step(cfg) * (done - tick_step) / (now - tick)
            tick, tick_step = now, done
            lr = learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.horizon)
            writer.add_scalar("train/loss", loss, done)
            writer.add_scalar("train/lr", lr, done)
            writer.add_scalar("train/tokens_per_sec", tps, done)
            writer.add_scalar("train/grad_norm", gnorm, done)
            for name, value in alpha_means(backend, alphas).items():
                writer.add_scalar(f"alpha/{name}", value, done)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if done % t.eval_every == 0 or done == t.max_steps:
            val_loss = backend.evaluate(batches.eval_batches(t.eval_batches))
            writer.add_scalar("val/loss", val_loss, done)
            writer.add_scalar("val/elapsed_sec", time.perf_counter() - began, done)
            bar.write(f"step {done}: val loss {val_loss:.4f}")
        if dynamics and (done % t.analysis_every == 0 or done == t.max_steps):
            dynamics.log(writer, backend, done)
        if done % t.ckpt_every == 0 or done == t.max_steps:
            backend.save(spec)
        bar.update(1)
    bar.close()
    backend.wait()
    if start >= t.max_steps:
        val_loss = backend.evaluate(batches.eval_batches(t.eval_batches))
    writer.add_scalar("val/final_loss", val_loss, t.max_steps)
    writer.close()
    print(f"final val loss {val_loss:.4f} after {t.max_steps} steps")
    print("sample:", repr(sample_text(backend, cfg, corpus)))
    return val_loss


def sample_text(backend, cfg: RunConfig, corpus) -> str:
    """A short greedy continuation of the start of the val split."""
    tok, n = corpus.tokenizer, cfg.train.sample_tokens
    if cfg.model.has_encoder:
        enc = np.asarray(corpus.val[:cfg.train.encoder_len], np.int32)
        ids = backend.sample(enc, np.array([cfg.model.bos_id], np.int32), n)
        return tok.decode(enc) + " ⟶ " + tok.decode(ids)
    prefix = np.asarray(corpus.val[:min(32, cfg.model.max_len_decoder - n)], np.int32)
    ids = backend.sample(None, prefix, n)
    return tok.decode(prefix) + " ⟶ " + tok.decode(ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ConfigError, DataError, CheckpointError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
