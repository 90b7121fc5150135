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
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from experiments import launch
from experiments.backends import BACKENDS, BackendUnavailable, backend_class
from experiments.dynamics import Dynamics
from experiments.run_lock import RunLock
from tnt import checkpoint_io
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
             "log_every", "analysis_every", "sample_tokens", "sample_temperature", "max_loss",
             "lr"}  # lr: continuing a diverged run from its last good checkpoint with a lower rate
# Train fields that describe the launch, not the run: a resume takes them from its own command
# line (a torchrun FSDP2 checkpoint resumes in one process without --set fsdp=false).
LAUNCH = {"fsdp"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--arch", choices=["encoder_decoder", "decoder_only"])
    p.add_argument("--norm", choices=["ngpt", "rmsnorm"])
    p.add_argument("--data", help="stdlib (default), a text file or folder, or a prepared "
                                  "token folder (python -m experiments.prepare)")
    p.add_argument("--tokenizer", metavar="byte|bpe|PATH",
                   help="byte (default), a BPE trained on the train split, or a Hugging Face "
                        "tokenizer.json (its special ids become pad/bos/eos)")
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
    train = {k: v for k, v in dataclasses.asdict(saved.train).items() if k not in LAUNCH}
    values = {**dataclasses.asdict(saved.model), **train, **explicit_overrides(args)}
    cfg = build_run_config("cpu", values, args.set)
    diff = config_differences(cfg.model, saved.model) + [
        d for d in config_differences(cfg.train, saved.train) if d.split(":")[0] not in RESUMABLE | LAUNCH]
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


class Diverged(RuntimeError):
    """The loss, gradient norm or parameters went non-finite or past `max_loss`; nothing after
    the last good checkpoint was saved (the message says which step to resume from)."""


def run_dir(args: argparse.Namespace, cfg: RunConfig) -> Path:
    out = Path(args.out or f"runs/{args.backend}-{cfg.model.arch}-{cfg.model.norm}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a run directory")
    return out


def saved_run_config(out: Path) -> RunConfig:
    """The config of a run killed before its first checkpoint, from its `config.json`."""
    try:
        return RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out} holds no committed checkpoint and no readable config.json "
                              f"to resume from ({e}); start it again without --resume") from e


def prepare_run(args: argparse.Namespace):
    """Everything before the first step; raises ConfigError/DataError/CheckpointError early."""
    Backend = backend_class(args.backend)
    sets = dict(parse_set(s) for s in args.set)
    cfg = build_run_config(args.preset, explicit_overrides(args), args.set)
    out = run_dir(args, cfg)
    ckpt_dir = out / "checkpoints"
    meta = None
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        if not out.is_dir():
            raise CheckpointError(f"checkpoint path {out.absolute()} does not exist")
        if ckpt_dir.is_dir() and checkpoint_io.committed(ckpt_dir):
            meta = checkpoint_io.newest_readable(ckpt_dir, checkpoint_io.read_meta)
            if meta["backend"] != args.backend:
                raise CheckpointError(f"{ckpt_dir} was written by the {meta['backend']} backend; "
                                      f"resume it with --backend {meta['backend']}")
            cfg = resume_config(RunConfig.from_dict(meta["config"]), args)
            corpus = load_corpus(cfg.train.data, tokenizer_from_spec(meta["tokenizer"]),
                                 cfg.train.val_percent)
        else:  # killed before its first checkpoint committed: start it again from its config
            cfg = resume_config(saved_run_config(out), args)
            corpus = load_corpus(cfg.train.data, cfg.train.tokenizer, cfg.train.val_percent,
                                 cfg.train.bpe_vocab_size)
    else:
        if ckpt_dir.is_dir() and checkpoint_io.committed(ckpt_dir):
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


def make_run_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create run directory --out {out}: {e.strerror or e}") from e


def remove_stale_temp(ckpt_dir: Path) -> None:
    """Temp folders of saves interrupted by a kill; only the lock holder may remove them."""
    for tmp in checkpoint_io.stale_temp_folders(ckpt_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}, the temp folder of an interrupted save", flush=True)


def restore_latest(backend, ckpt_dir: Path, main: bool = True) -> dict:
    """Restore the newest checkpoint that restores; newer unreadable steps are moved aside to
    `checkpoints/corrupt-<step>` (kept for inspection) so that the run can save them again, by
    the main process only (the others would race it)."""
    meta = checkpoint_io.newest_readable(ckpt_dir, lambda step_dir, _: backend.restore(step_dir))
    for step_dir, _ in checkpoint_io.committed(ckpt_dir) if main else ():
        if int(step_dir.name) > meta["step"]:
            aside = step_dir.with_name(f"corrupt-{step_dir.name}")
            os.replace(step_dir, aside)
            print(f"moved the unreadable checkpoint {step_dir} aside to {aside}", flush=True)
    return meta


def check_finite(done: int, metrics: dict | None, t, backend, last_saved: int | None,
                 ckpt_dir: Path, params: bool = False, val_loss: float | None = None) -> None:
    """The divergence guard: raise Diverged when the train loss or gradient norm (or, before a
    save or the dynamics, any parameter; or the validation loss) is not finite, or the train
    loss exceeds `max_loss`."""
    problem = None
    if metrics is not None:
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            problem = f"train loss {loss}, gradient norm {gnorm}"
        elif t.max_loss and loss > t.max_loss:
            problem = f"train loss {loss:.4g} exceeds max_loss={t.max_loss:g}"
    if problem is None and val_loss is not None and not math.isfinite(val_loss):
        problem = f"validation loss {val_loss}"
    if problem is None and params:
        bad = backend.nonfinite()
        if bad:
            problem = f"non-finite parameters ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    if problem is None:
        return
    if last_saved is None:
        advice = "no checkpoint was written; start again with a lower --lr"
    else:
        advice = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}; continue from it "
                  f"with --resume and e.g. a lower --lr")
    raise Diverged(f"training diverged at step {done}: {problem}; nothing non-finite was saved, "
                   f"{advice}")


def train(args: argparse.Namespace) -> float:
    """One run; in a multi-process job (torchrun, jax.distributed) every process calls it, and
    only the main one (`launch.Role.main`) holds the run folder's lock and writes to it."""
    role = launch.start(args)
    lock = None
    if role.main and args.out and Path(args.out).is_dir():  # a folder in use: name the holder first
        lock = RunLock(args.out)
        lock.acquire()
    try:
        Backend, cfg, out, ckpt_dir, meta, corpus, batches = prepare_run(args)
        role.check(cfg)
        make_run_dir(out)
        if role.main:
            if lock is None:
                lock = RunLock(out)
                lock.acquire()
            lock.record()
        return _train_locked(args, role, Backend, cfg, out, ckpt_dir, meta, corpus, batches)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(args, role, Backend, cfg, out, ckpt_dir, meta, corpus, batches) -> float:
    if role.main:
        remove_stale_temp(ckpt_dir)
    if meta is None and role.main:
        if isinstance(corpus.tokenizer, BPETokenizer):
            corpus.tokenizer.save(out / "tokenizer.json")
        write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
    backend = Backend(cfg, **role.backend_kwargs)
    last_saved = None
    if meta is not None:
        last_saved = restore_latest(backend, ckpt_dir, role.main)["step"]
    backend.open(ckpt_dir, cfg.train.keep_checkpoints)
    start = backend.step_count
    writer = event_writer(out / "tb", start) if role.main else launch.NullWriter()
    bar = tqdm(total=cfg.train.max_steps, initial=start, desc="train", dynamic_ncols=True,
               mininterval=1.0, disable=not role.main)
    try:
        return _loop(args, backend, cfg, out, ckpt_dir, corpus, batches, writer, bar, start,
                     last_saved)
    finally:
        bar.close()
        backend.wait()  # a save in flight holds finite parameters: let it commit
        writer.close()


def event_writer(tb: Path, start: int):
    """The TensorBoard writer of a session that starts after `start` steps, one file per process.

    Events an earlier session logged after `start` are superseded by this one's (TensorBoard's
    purge step), so every step shows once. TensorBoard reads a folder's event files in name
    order, and a name starts with the second its file was opened: two sessions opened within one
    second would be ordered by their pid suffix, and the earlier session's purge could then erase
    the later one's steps. So a session waits until its second is later than every existing
    file's before it opens its own."""
    from tensorboardX import SummaryWriter

    seconds = [int(p.name.split(".")[3]) for p in tb.glob("events.out.tfevents.*")
               if p.name.split(".")[3].isdigit()] if tb.is_dir() else []
    wait = max(seconds, default=0) + 1 - time.time()
    if wait > 2:  # a file dated in the future: waiting would not help
        print(f"warning: {tb} holds an event file dated {wait:.0f} s ahead of this clock; "
              "TensorBoard may show superseded steps", file=sys.stderr)
    elif wait > 0:
        time.sleep(wait)
    return SummaryWriter(str(tb), purge_step=start + 1 if tb.is_dir() else None,
                         filename_suffix=f".{os.getpid()}")


def _loop(args, backend, cfg, out, ckpt_dir, corpus, batches, writer, bar, start,
          last_saved) -> float:
    t, spec = cfg.train.resolved(cfg.model.norm), corpus.tokenizer.spec
    alphas = [n for n, s in param_specs(cfg.model).items() if s.kind == "alpha"]
    dynamics = Dynamics(cfg.model) if t.analysis_every else None
    print(f"TnT pretrain: backend={args.backend} arch={cfg.model.arch} norm={cfg.model.norm} "
          f"d_model={cfg.model.d_model} steps {start}->{t.max_steps} run dir {out}", flush=True)
    if getattr(corpus.tokenizer, "note", None):
        print(corpus.tokenizer.note)
    val_loss = float("nan")
    tick, tick_step = time.perf_counter(), start
    began = None  # wall clock for val/elapsed_sec, from the end of the first (compiling) step
    for step in range(start, t.max_steps):
        metrics = backend.step(batches.train_batch(step, backend.rows))
        began = began or time.perf_counter()
        done = step + 1
        last = done == t.max_steps
        log, evaluate = done % t.log_every == 0 or last, done % t.eval_every == 0 or last
        analyse = dynamics is not None and (done % t.analysis_every == 0 or last)
        save = done % t.ckpt_every == 0 or last
        if log or evaluate or analyse or save:  # the guard reads the device only when due
            check_finite(done, metrics, t, backend, last_saved, ckpt_dir, params=analyse or save)
        if log:
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
        if evaluate:
            val_loss = backend.evaluate(batches.eval_batches(t.eval_batches))
            check_finite(done, None, t, backend, last_saved, ckpt_dir, val_loss=val_loss)
            writer.add_scalar("val/loss", val_loss, done)
            writer.add_scalar("val/elapsed_sec", time.perf_counter() - began, done)
            bar.write(f"step {done}: val loss {val_loss:.4f}")
        if analyse:
            dynamics.log(writer, backend, done)
        if save:
            writer.flush()  # everything the checkpoint covers is on disk before it commits
            backend.save(spec)
            last_saved = done
        bar.update(1)
    bar.close()
    backend.wait()
    if start >= t.max_steps:
        val_loss = backend.evaluate(batches.eval_batches(t.eval_batches))
    writer.add_scalar("val/final_loss", val_loss, t.max_steps)
    print(f"final val loss {val_loss:.4f} after {t.max_steps} steps")
    if cfg.train.sample_tokens:  # 0: no end-of-run sample
        print("sample:", repr(sample_text(backend, cfg, corpus)))
    return val_loss


def sample_text(backend, cfg: RunConfig, corpus) -> str:
    """A short continuation (through `inference`) of the start of the val split, sampled at
    `sample_temperature` with the run's seed (greedy at 0: a small model's greedy decoding tends
    to repeat one token)."""
    tok, t = corpus.tokenizer, cfg.train
    n = t.sample_tokens
    length = t.encoder_len if cfg.model.has_encoder else min(32, cfg.model.max_len_decoder - n)
    prompt = tok.decode(corpus.val[:max(length, 0)])
    return prompt + " ⟶ " + backend.sample(tok, prompt, n, t.sample_temperature, t.seed)


EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one `error:` line; nothing written is changed),
    3 training diverged (one `error:` line naming the step to resume from)."""
    args = parse_args(argv)
    try:
        train(args)
    except (ConfigError, DataError, CheckpointError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
