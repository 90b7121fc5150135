"""One training run as a library object:

    from tnt.config import build_run_config
    from tnt.run import Run

    Run(build_run_config("cpu-tiny", {"max_steps": 50}), out="runs/tiny", backend="torch").fit()
    Run.resume("runs/tiny", backend="torch", overrides={"max_steps": 100}).fit()

The run is framework-neutral: data, the run folder's lock, resume, the loop with its divergence
guard, validation, TensorBoard, the checkpoint schedule and the end-of-run sample. The backend's
`Trainer` (`tnt.backend`) owns the model, the optimizer, the compiled step and the checkpoint
format. `experiments.pretrain` is its command line.

Run directory: `RUN_DIR/config.json`, `RUN_DIR/tb/` (TensorBoard events),
`RUN_DIR/checkpoints/<step>/`, and `RUN_DIR/tokenizer.json` for a BPE run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from tnt import checkpoint_io
from tnt.backend import Launch, Role, Trainer
from tnt.backend import backend as backend_named
from tnt.checkpoint_meta import CheckpointError, config_differences
from tnt.config import ConfigError, RunConfig, build_run_config
from tnt.data import Batches, BatchSpec, load_corpus
from tnt.dynamics import Dynamics
from tnt.events import EventWriter
from tnt.loggers import Loggers, WandbLogger, parse_loggers
from tnt.run_lock import RunLock
from tnt.schedule import learning_rate
from tnt.special_ids import tokenizer_special_ids
from tnt.tokenizer import BPETokenizer, tokenizer_from_spec
from tnt.units import bits_per_byte

# Train fields that may change when resuming; anything else must match the checkpoint.
RESUMABLE = {"max_steps", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
             "log_every", "analysis_every", "sample_tokens", "sample_temperature", "max_loss",
             "lr",  # lr: continuing a diverged run from its last good checkpoint with a lower rate
             "eval_tasks", "eval_tasks_limit", "eval_tasks_path"}
# Train fields that describe the launch, not the run: a resume takes them from its own command
# line (a torchrun FSDP2 checkpoint resumes in one process without --set fsdp=false).
LAUNCH = {"fsdp", "compile"}


class Diverged(RuntimeError):
    """The loss, gradient norm or parameters went non-finite or past the loss ceiling; nothing after
    the last good checkpoint was saved (the message says which step to resume from)."""


def resume_config(saved: RunConfig, overrides: dict | None = None,
                  sets: Sequence[str] = ()) -> RunConfig:
    """The saved config with `overrides` (field -> value) and `sets` ("field=value") applied;
    refuse changes that break resume."""
    train = {k: v for k, v in dataclasses.asdict(saved.train).items() if k not in LAUNCH}
    values = {**dataclasses.asdict(saved.model), **train, **(overrides or {})}
    cfg = build_run_config("cpu", values, list(sets))
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


def saved_run_config(out: Path) -> RunConfig:
    """The config of a run killed before its first checkpoint, from its `config.json`."""
    try:
        return RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out} holds no committed checkpoint and no readable config.json "
                              f"to resume from ({e}); start it again without --resume") from e


def make_run_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create run directory --out {out}: {e.strerror or e}") from e


def remove_stale_temp(ckpt_dir: Path) -> None:
    """What saves and prunes interrupted by a kill left; only the lock holder may remove it."""
    for tmp in checkpoint_io.stale_temp_folders(ckpt_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}, left by an interrupted save or prune", flush=True)


def restore_latest(trainer: Trainer, ckpt_dir: Path, main: bool = True) -> dict:
    """Restore the newest checkpoint that restores; newer unreadable steps are moved aside to
    `checkpoints/corrupt-<step>` (kept for inspection) so that the run can save them again, by
    the main process only (the others would race it)."""
    meta = checkpoint_io.newest_readable(ckpt_dir, lambda step_dir, _: trainer.restore(step_dir))
    for step_dir, _ in checkpoint_io.committed(ckpt_dir) if main else ():
        if int(step_dir.name) > meta["step"]:
            aside = step_dir.with_name(f"corrupt-{step_dir.name}")
            os.replace(step_dir, aside)
            print(f"moved the unreadable checkpoint {step_dir} aside to {aside}", flush=True)
    return meta


def nonfinite(metrics: dict | None, trainer: Trainer | None = None,
              val_loss: float | None = None) -> str | None:
    """A non-finite train loss or gradient norm, a non-finite validation loss, or (with
    `trainer`) non-finite parameters, read as one flag each; None when all are finite."""
    if metrics is not None:
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            return f"train loss {loss}, gradient norm {gnorm}"
    if val_loss is not None and not math.isfinite(val_loss):
        return f"validation loss {val_loss}"
    bad = trainer.nonfinite() if trainer is not None else []
    if bad:
        return f"non-finite parameters ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return None


def over_ceiling(metrics: dict | None, cfg: RunConfig) -> str | None:
    """A finite train loss over the run's `loss_ceiling` (`max_loss`, by default twice
    ln(vocab_size); 0: none), or None."""
    if metrics is None:
        return None
    loss, ceiling = float(metrics["loss"]), cfg.loss_ceiling
    if not (ceiling and loss > ceiling):
        return None
    if cfg.train.max_loss is not None:
        return f"train loss {loss:.4g} exceeds max_loss={ceiling:g}"
    return (f"train loss {loss:.4g} exceeds the divergence ceiling {ceiling:.4g} (twice "
            f"ln({cfg.model.vocab_size}), the loss of a uniform prediction; --set "
            f"max_loss=X sets another, 0 none)")


def diverged_message(step: int, problem: str, finite: bool, last_saved: int | None,
                     ckpt_dir: Path) -> str:
    """What stopped the run at `step`, what of it was not saved, and where to continue from:
    `finite` weights past the loss ceiling, or non-finite values."""
    kept = (f"step {step}'s weights (finite, but past the loss ceiling) were not saved" if finite
            else "nothing non-finite was saved")
    if last_saved is None:
        advice = "no checkpoint was written; start again with a lower --lr"
    else:
        advice = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}; "
                  f"continue from it with --resume and e.g. a lower --lr")
    return f"training diverged at step {step}: {problem}; {kept}, {advice}"


def event_writer(tb: Path, start: int) -> EventWriter:
    """The TensorBoard writer of a session that starts after `start` steps, one file per process;
    it writes synchronously, so a flush before a save puts every step the checkpoint covers on
    disk (`tnt.events`).

    Events an earlier session logged after `start` are superseded by this one's (TensorBoard's
    purge step), so every step shows once. TensorBoard reads a folder's event files in name
    order, and a name starts with the second its file was opened: two sessions opened within one
    second would be ordered by their pid suffix, and the earlier session's purge could then erase
    the later one's steps. So a session waits until its second is later than every existing
    file's before it opens its own."""
    seconds = [int(p.name.split(".")[3]) for p in tb.glob("events.out.tfevents.*")
               if p.name.split(".")[3].isdigit()] if tb.is_dir() else []
    wait = max(seconds, default=0) + 1 - time.time()
    if wait > 2:  # a file dated in the future: waiting would not help
        print(f"warning: {tb} holds an event file dated {wait:.0f} s ahead of this clock; "
              "TensorBoard may show superseded steps", file=sys.stderr)
    elif wait > 0:
        time.sleep(wait)
    return EventWriter(tb, purge_step=start + 1 if tb.is_dir() else None,
                       filename_suffix=f".{os.getpid()}")


class NullWriter:
    """The TensorBoard writer of a process that is not the main one: writes nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def sample_text(trainer: Trainer, cfg: RunConfig, corpus) -> str:
    """A short continuation (through `inference`) of the start of the val split, sampled at
    `sample_temperature` with the run's seed (greedy at 0: a small model's greedy decoding tends
    to repeat one token)."""
    tok, t = corpus.tokenizer, cfg.train
    n = t.sample_tokens
    length = t.encoder_len if cfg.model.has_encoder else min(32, cfg.model.max_len_decoder - n)
    prompt = tok.decode(corpus.val[:max(length, 0)])
    return prompt + " ⟶ " + trainer.sample(tok, prompt, n, t.sample_temperature, t.seed)


def make_downstream(cfg: RunConfig, tokenizer, backend: str, role: Role):
    """The `eval_tasks` runner (tnt.lm_eval_model.Downstream), or None when no task is named."""
    t = cfg.train
    if not t.task_names:
        return None
    if role.count > 1:
        raise ConfigError("eval_tasks runs in one process; score a multi-process run's checkpoints "
                          "with python -m experiments.evaluate RUN --tasks ...")
    try:
        from tnt.lm_eval_model import Downstream, TaskError
    except ImportError as e:
        raise ConfigError(f"eval_tasks needs lm-evaluation-harness, the 'eval' extra ({e.name} is "
                          f"missing): pip install 'tnt[eval]'") from e
    try:
        return Downstream(t.task_names, t.eval_tasks_limit, t.eval_tasks_path, backend, tokenizer)
    except TaskError as e:
        raise ConfigError(f"eval_tasks: {e}") from e


class Run:
    """A training run in the folder `out` (default `runs/<backend>-<arch>-<norm>-<time>`).

    `fit()` trains to `cfg.train.max_steps` and returns the final validation loss. In a
    multi-process job (torchrun, jax.distributed: `launch`) every process builds the same Run
    and calls `fit()`; only the main one holds the folder's lock and writes to it. The vocabulary
    size and special ids come from the data's tokenizer unless `keep_vocab_size` (a larger
    `vocab_size` is kept). Raises ConfigError, DataError, CheckpointError before anything is
    written, Diverged when training diverges.
    """

    def __init__(self, cfg: RunConfig, out: str | Path | None = None, backend: str = "jax", *,
                 keep_vocab_size: bool = False, launch: Launch | None = None,
                 loggers: str | Sequence[str] = ("tensorboard",)) -> None:
        if out is not None and not str(out).strip():
            raise ConfigError("--out is empty; name the run directory (or leave --out out for "
                              "runs/<backend>-<arch>-<norm>-<time>)")
        self.backend = backend_named(backend)
        self.loggers = parse_loggers(loggers)  # where the scalars go (tnt.loggers)
        self.cfg, self.launch, self.keep_vocab_size = cfg, launch or Launch(), keep_vocab_size
        self.given = out is not None
        self.out = Path(out if self.given else f"runs/{backend}-{cfg.model.arch}-{cfg.model.norm}-"
                                              f"{time.strftime('%Y%m%d-%H%M%S')}")
        self._resume: tuple[dict, Sequence[str]] | None = None
        self.meta: dict | None = None  # the checkpoint a resume continues
        self.trainer: Trainer | None = None  # built by fit(), kept for inspection afterwards
        self.last_saved: int | None = None  # the newest good checkpoint's step (restored or saved)

    @classmethod
    def resume(cls, out: str | Path, backend: str = "jax", overrides: dict | None = None,
               sets: Sequence[str] = (), *, launch: Launch | None = None,
               loggers: str | Sequence[str] = ("tensorboard",)) -> Run:
        """Continue the run in `out` from its newest readable checkpoint (or from its
        `config.json` if it was killed before the first), with the resumable fields of
        `overrides` and `sets` changed (`RESUMABLE`; anything else is refused)."""
        run = cls(None, out, backend, launch=launch, loggers=loggers)  # config: the checkpoint's
        run._resume = (dict(overrides or {}), tuple(sets))
        return run

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def fit(self) -> float:
        self.role = self._start()
        lock = None
        if self.role.main and self.given and self.out.is_dir():  # in use: name the holder first
            lock = RunLock(self.out)
            lock.acquire()
        try:
            self._prepare()
            self.backend.check(self.role, self.cfg)
            make_run_dir(self.out)
            if self.role.main and lock is None:
                lock = RunLock(self.out)
                lock.acquire()
            return self._train(lock)
        finally:
            if lock is not None:
                lock.release()

    def _start(self) -> Role:
        """Join the job; the other processes' prints and tqdm.write would repeat the main one's."""
        role = self.backend.start(self.launch)
        if not role.main:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        return role

    def _prepare(self) -> None:
        """Config, corpus and batches; refuses bad input before anything is written."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a run directory")
        if self._resume is None:
            if self.ckpt_dir.is_dir() and checkpoint_io.committed(self.ckpt_dir):
                raise CheckpointError(f"{self.out} already holds checkpoints; pass --resume to "
                                      f"continue it or choose another --out (nothing was changed)")
            t = self.cfg.train
            self.corpus = load_corpus(t.data, t.tokenizer, t.val_percent, t.bpe_vocab_size, t.text_field)
            self.cfg = fit_tokenizer(self.cfg, self.corpus.tokenizer, self.keep_vocab_size)
        else:
            self._prepare_resume(*self._resume)
        self.batches = Batches(batch_spec(self.cfg), self.corpus.train, self.corpus.val,
                               self.cfg.train.seed)
        self.downstream = make_downstream(self.cfg, self.corpus.tokenizer, self.backend.name, self.role)

    def _prepare_resume(self, overrides: dict, sets: Sequence[str]) -> None:
        if not self.out.is_dir():
            raise CheckpointError(f"checkpoint path {self.out.absolute()} does not exist")
        if self.ckpt_dir.is_dir() and checkpoint_io.committed(self.ckpt_dir):
            self.meta = checkpoint_io.newest_readable(self.ckpt_dir, checkpoint_io.read_meta)
            if self.meta["backend"] != self.backend.name:
                raise CheckpointError(f"{self.ckpt_dir} was written by the {self.meta['backend']} "
                                      f"backend; resume it with --backend {self.meta['backend']}")
            self.cfg = resume_config(RunConfig.from_dict(self.meta["config"]), overrides, sets)
            self.corpus = load_corpus(self.cfg.train.data, tokenizer_from_spec(self.meta["tokenizer"]),
                                      self.cfg.train.val_percent, text_field=self.cfg.train.text_field)
        else:  # killed before its first checkpoint committed: start it again from its config
            if not self.ckpt_dir.is_dir():  # every run makes it as it starts
                raise CheckpointError(
                    f"{self.ckpt_dir} is missing (deleted?), so there is nothing to resume; put the "
                    f"checkpoints back, or start again at step 0 without --resume (its TensorBoard "
                    f"steps are then superseded)")
            self.cfg = resume_config(saved_run_config(self.out), overrides, sets)
            print(f"note: {self.out} holds no committed checkpoint yet (killed before its first); "
                  f"starting it again at step 0 from its config.json", flush=True)
            t = self.cfg.train
            self.corpus = load_corpus(t.data, t.tokenizer, t.val_percent, t.bpe_vocab_size, t.text_field)

    def _train(self, lock: RunLock | None) -> float:
        """Build or restore the trainer (an unreadable checkpoint is refused before anything is
        written), write the run's config, then run the loop."""
        main = self.role.main
        self.trainer = self.backend.trainer(self.cfg, self.role)
        self.last_saved = None
        if self.meta is not None:
            self.last_saved = restore_latest(self.trainer, self.ckpt_dir, main)["step"]
        if main:
            lock.record()
            self.ckpt_dir.mkdir(exist_ok=True)  # marks a started run: a resume needs it
            remove_stale_temp(self.ckpt_dir)
        if self.meta is None and main:
            if isinstance(self.corpus.tokenizer, BPETokenizer):
                self.corpus.tokenizer.save(self.out / "tokenizer.json")
            write_atomic(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=1))
        self.trainer.open(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        start = self.trainer.step_count
        self.writer = self._writer(start) if main else NullWriter()
        self.bar = tqdm(total=self.cfg.train.max_steps, initial=start, desc="train",
                        dynamic_ncols=True, mininterval=1.0, disable=not main)
        try:
            return self._loop(start)
        finally:
            self.bar.close()
            self.trainer.wait()  # a save in flight holds finite parameters: let it commit
            self.writer.close()

    def _writer(self, start: int) -> Loggers:
        """Every chosen logger as one writer (`tnt.loggers`)."""
        chosen = []
        for name in self.loggers:
            chosen.append(event_writer(self.out / "tb", start) if name == "tensorboard"
                          else WandbLogger(self.out, self.cfg, start))
        return Loggers(chosen)

    def _loop(self, start: int) -> float:
        cfg, t = self.cfg, self.cfg.train.resolved(self.cfg.model.norm)
        self.t = t
        dynamics = Dynamics(cfg.model) if t.analysis_every else None
        print(f"TnT pretrain: backend={self.backend.name} arch={cfg.model.arch} "
              f"norm={cfg.model.norm} d_model={cfg.model.d_model} steps {start}->{t.max_steps} "
              f"run dir {self.out}", flush=True)
        if getattr(self.corpus.tokenizer, "note", None):
            print(self.corpus.tokenizer.note)
        for note in self.corpus.notes:
            print(note)
        val_loss = float("nan")
        self.tick = (time.perf_counter(), start)
        self.began = None  # wall clock for val/elapsed_sec, from the end of the first (compiling) step
        for step in range(start, t.max_steps):
            metrics = self.trainer.step(self.batches.train_batch(step, self.trainer.rows))
            self.began = self.began or time.perf_counter()
            done = step + 1
            last = done == t.max_steps
            log, evaluate = done % t.log_every == 0 or last, done % t.eval_every == 0 or last
            analyse = dynamics is not None and (done % t.analysis_every == 0 or last)
            save = done % t.ckpt_every == 0 or last
            if log or evaluate or analyse or save:  # the guard reads the device only when due
                self._guard(done, metrics, params=analyse or save)
            if log:
                self._log(step, metrics)
            if evaluate:
                val_loss = self._validate(done)
            if analyse:
                dynamics.log(self.writer, self.trainer, done)
            if save:
                self._save(done)
            self.bar.update(1)
        return self._finish(start, val_loss)

    def _guard(self, done: int, metrics: dict | None, params: bool = False,
               val_loss: float | None = None) -> None:
        """Raise Diverged, naming the last good checkpoint, when something is non-finite or the
        loss is past the ceiling."""
        bad = nonfinite(metrics, self.trainer if params else None, val_loss)
        problem = bad or over_ceiling(metrics, self.cfg)
        if problem is not None:
            raise Diverged(diverged_message(done, problem, bad is None, self.last_saved,
                                            self.ckpt_dir))

    def _log(self, step: int, metrics: dict) -> None:
        t, done = self.t, step + 1
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        now = time.perf_counter()
        tps = tokens_per_step(self.cfg) * (done - self.tick[1]) / (now - self.tick[0])
        self.tick = (now, done)
        lr = learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.horizon)
        self.writer.add_scalar("train/loss", loss, done)
        self.writer.add_scalar("train/lr", lr, done)
        self.writer.add_scalar("train/tokens_per_sec", tps, done)
        self.writer.add_scalar("train/grad_norm", gnorm, done)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")

    def _validate(self, done: int) -> float:
        val_loss = self.trainer.evaluate(self.batches.eval_batches(self.t.eval_batches))
        self._guard(done, None, val_loss=val_loss)
        self.writer.add_scalar("val/loss", val_loss, done)
        self.writer.add_scalar("val/elapsed_sec", time.perf_counter() - self.began, done)
        if done == self.t.max_steps:  # before the last checkpoint commits: logged once, ever
            self.writer.add_scalar("val/final_loss", val_loss, done)
        self.bar.write(f"step {done}: val loss {val_loss:.4f}")
        if self.downstream is not None:
            scores = self.downstream(self.trainer.model(), self.writer, done)
            self.bar.write(f"step {done}: " + ", ".join(f"{task} {m} {v:.4f}" for task, ms in scores.items()
                                                        for m, v in ms.items() if not m.endswith("_stderr")))
        return val_loss

    def _save(self, done: int) -> None:
        self.writer.flush()  # every step the checkpoint covers is on disk before it commits
        self.trainer.save(self.corpus.tokenizer.spec)
        self.last_saved = done

    def _bits_per_byte(self, nats: float) -> str:
        """The loss in bits per byte of the val split's text (tnt/units.py), comparable across
        tokenizers; '?' when the split holds no text."""
        n_tokens, n_bytes = len(self.corpus.val), self.corpus.split_bytes("val")
        return f"{bits_per_byte(nats, n_tokens, n_bytes):.4f}" if n_tokens and n_bytes else "?"

    def _finish(self, start: int, val_loss: float) -> float:
        """The final validation loss (evaluated now if no step ran) and the end-of-run sample."""
        t = self.t
        self.bar.close()
        self.trainer.wait()
        if start >= t.max_steps:  # a finished run, resumed: its final loss is logged already
            val_loss = self.trainer.evaluate(self.batches.eval_batches(t.eval_batches))
        print(f"final val loss {val_loss:.4f} nats/token ({self._bits_per_byte(val_loss)} bits/byte) "
              f"after {t.max_steps} steps")
        if self.cfg.train.sample_tokens:  # 0: no end-of-run sample
            print("sample:", repr(sample_text(self.trainer, self.cfg, self.corpus)))
        return val_loss
