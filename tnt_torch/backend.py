"""The torch adapter (`tnt.backend.Backend`): the training state, checkpoints with their
metadata, scoring, decoding, devices and the torchrun process group, over `tnt_torch.train`,
`checkpoint`, `generate` and `distributed` (mirror of `tnt_jax/backend.py`)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from tnt import checkpoint_io
from tnt.backend import Launch, Role, env_int
from tnt.checkpoint_meta import adam_moment_factors, make_meta
from tnt.config import ConfigError, ModelConfig, RunConfig
from tnt.data import check_token_ids, has_pad
from tnt.generation import Generation, Sampling
from tnt_torch import checkpoint, distributed
from tnt_torch.checkpoint import load  # noqa: F401 (the adapter's `load`)
from tnt_torch.generate import generate as _generate
from tnt_torch.generate import inference
from tnt_torch.model import TnT, load_canonical, to_canonical
from tnt_torch.optim import TnTOptimizer
from tnt_torch.score import label_logprobs
from tnt_torch.train import accumulate_grads, configure_threads, token_sum, want_compile

name = "torch"


class Trainer:
    """The training state of a torch run (`tnt.backend.Trainer`): the model, the `TnTOptimizer`
    and this rank's `distributed.Replica`.

    With `compile` on (the config field, `want_compile`) the blocks go through `torch.compile`,
    also under DDP; if the first compiled step fails (no C++ compiler, an unsupported
    platform), the trainer warns and continues eagerly. Compiled and eager steps differ by float
    rounding only.
    """

    name = name

    def __init__(self, cfg: RunConfig, device: str | torch.device | None = None) -> None:
        configure_threads()
        self.cfg = cfg
        if distributed.launched():  # a torchrun rank: one device per process, DDP or FSDP2
            device = distributed.init_process_group()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.train.fsdp and distributed.launched():  # built on the mesh: shards only
            self.net = distributed.build_sharded(cfg.model, cfg.train.seed, self.device)
        else:
            self.net = TnT(cfg.model, seed=cfg.train.seed).to(self.device)
        self.replica = distributed.Replica(self.net, cfg, self.device)
        self.rows = self.replica.rows
        self.opt = TnTOptimizer(self.net, cfg.model, cfg.train)
        self.directory, self.keep = None, None
        self.compiled = want_compile(cfg.train, self.device)
        self._unproven = self.compiled  # the first compiled step may still fall back
        if self.compiled:
            self.net.compile_blocks()

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.replica.share(batch).items():
            check_token_ids(value, self.cfg.model.vocab_size, key)
            out[key] = torch.as_tensor(np.asarray(value, np.int64), device=self.device)
        return out

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        self.net.train()
        tensors = self._put(batch)
        accum = self.cfg.train.grad_accum
        padded = has_pad(batch, self.cfg.model.pad_id)
        if self._unproven:
            try:
                loss, count = accumulate_grads(self.replica, tensors, accum, padded=padded)
            except ValueError:
                raise
            except Exception as e:  # inductor/dynamo failures come in many types
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training "
                              f"eagerly", RuntimeWarning, stacklevel=2)
                self.net.compile_blocks(False)
                self.compiled = False
                self.opt.zero_grad(set_to_none=True)
                loss, count = accumulate_grads(self.replica, tensors, accum, padded=padded)
            self._unproven = False
        else:
            loss, count = accumulate_grads(self.replica, tensors, accum, padded=padded)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": self.opt.last_grad_norm, "tokens": count}

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Token-weighted mean loss over `batches`."""
        self.net.eval()
        total, count = 0.0, 0
        for batch in batches:
            s, c = token_sum(self.net, self._put(batch), self.cfg.train.grad_accum,
                             padded=has_pad(batch, self.cfg.model.pad_id))
            total, count = total + s, count + c
        if self.replica.fsdp:
            distributed.reshard(self.net)
        total, count = self.replica.sum(total, count)  # each rank evaluated its rows
        return total / max(count, 1)

    @property
    def step_count(self) -> int:
        return self.opt.step_count

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """Some parameters as numpy (e.g. the alphas for logging)."""
        named = dict(self.net.named_parameters())  # FSDP2: gathered on every rank
        return {n: distributed.full(named[n].detach()).cpu().numpy().copy() for n in names}

    def nonfinite(self) -> list[str]:
        """Parameters holding a NaN or an infinity: one flag each computed on the device (under
        FSDP2 each rank checks its shards and the flags are summed over the ranks)."""
        named = list(self.net.named_parameters())
        bad = torch.stack([(~torch.isfinite(distributed.local(p.detach()))).any() for _, p in named])
        flags = self.replica.sum(*bad.double().tolist())
        return [n for (n, _), b in zip(named, flags, strict=True) if b]

    def model(self) -> TnT:
        """The trained module (under FSDP2 its parameters are this rank's shards)."""
        return self.net

    def open(self, directory, keep: int) -> None:
        self.directory, self.keep = directory, keep

    def save(self, tokenizer_spec: dict) -> None:
        if self.directory is None:
            raise RuntimeError("call open(directory, keep) before save()")
        if not (self.replica.main or self.replica.fsdp):  # DDP: every rank holds the same state
            return
        params, state = to_canonical(self.net), self.opt.canonical_state()  # FSDP2: all gather
        if not self.replica.main:  # rank 0 writes
            return
        step = self.step_count
        meta = make_meta(self.name, step, self.cfg, tokenizer_spec)
        checkpoint.save(self.directory, step, params, state, meta, self.keep)

    def wait(self) -> None:
        """Saves are synchronous; nothing to wait for."""

    def restore(self, path) -> dict:
        step_dir, _ = checkpoint_io.find_checkpoint(path, self.name)
        params, opt_state, meta = checkpoint.restore(step_dir, self.cfg.model)
        load_canonical(self.net, params)
        try:
            self.opt.load_canonical_state(opt_state, meta["step"],
                                          adam_moment_factors(meta, self.cfg.model))
        except (KeyError, ValueError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path}: {e}") from e
        return meta

    def sample(self, tokenizer, prompt: str, n: int, temperature: float = 0.0,
               seed: int = 0) -> str:
        """`inference` of up to `n` new tokens from `prompt` (the end-of-run sample): greedy, or
        sampled at `temperature` with `seed`."""
        net = self.net
        if self.replica.fsdp:  # decoding calls more than forward: a whole copy on every rank
            net = load_canonical(TnT(self.cfg.model), to_canonical(self.net)).to(self.device)
        return inference(net, tokenizer, prompt, max_length=n, temperature=temperature,
                         seed=seed)


def start(launch: Launch) -> Role:
    """torchrun's `RANK` and `WORLD_SIZE`; each rank's `Trainer` joins the process group."""
    if launch.mesh or launch.coordinator:
        raise ConfigError("--mesh and --coordinator are for --backend jax; launch torch "
                          "with torchrun --nproc-per-node N (docs/scale.md)")
    return Role(env_int("RANK") or 0, env_int("WORLD_SIZE") or 1)


def check(role: Role, cfg: RunConfig) -> None:
    """FSDP2 needs several ranks; the batch must split over them."""
    if cfg.train.fsdp and role.count == 1:
        raise ConfigError(distributed.FSDP_NEEDS_RANKS)
    if role.count > 1:
        cfg.train.check_rows_split(role.count, f"{role.count} ranks")


def trainer(cfg: RunConfig, role: Role | None = None) -> Trainer:
    return Trainer(cfg, **(role.options if role else {}))


def init_model(cfg: ModelConfig, seed: int = 0) -> TnT:
    return TnT(cfg, seed=seed).eval()


def _checked(model: TnT, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    out = {}
    for key, value in batch.items():
        check_token_ids(value, model.cfg.vocab_size, key)
        out[key] = torch.as_tensor(np.asarray(value, np.int64), device=device)
    return out


def token_sums(model: TnT, cfg: RunConfig) -> Callable[[dict], tuple[float, int]]:
    model.eval()
    return lambda batch: token_sum(model, _checked(model, batch), cfg.train.grad_accum,
                                   padded=has_pad(batch, model.cfg.pad_id))


@torch.no_grad()
def token_logprobs(model: TnT, batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(label_logprobs(model, batch)[0], np.float32)


def generate(model: TnT, prompts: list[np.ndarray], max_new_tokens: int, sampling: Sampling, *,
             use_cache: bool = True, warn: bool = True, stop_at_eos: bool = True) -> Generation:
    return _generate(model, prompts, max_new_tokens, sampling, use_cache=use_cache, warn=warn,
                     stop_at_eos=stop_at_eos)


def decode_threads(n: int) -> int:
    """Decoding is a chain of small ops: on a shared CPU, torch's spinning worker threads cost
    more than they give, so benchmarks pin `n` (0 keeps torch's default; GPUs are untouched)."""
    if n and not torch.cuda.is_available():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def devices() -> dict:
    found = ["cpu"]
    if torch.cuda.is_available():
        found = [f"cuda:{torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found = ["mps"]
    return {"framework": "torch", "version": torch.__version__, "cuda": torch.version.cuda,
            "devices": found, "accelerator": found != ["cpu"]}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def accelerator() -> bool:
    return torch.cuda.is_available()


def matmul_seconds(n: int, repeats: int) -> float:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    torch.mm(a, b)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_memory_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
