"""Typed configuration shared by both frameworks (docs/design.md, "Config").

`ModelConfig` is saved as JSON in every checkpoint; the field names are the same in `tnt_jax`
and `tnt_torch`. `TrainConfig` holds the optimizer, schedule, data and logging settings. Both are
frozen dataclasses validated in `__post_init__`, so a bad value fails where it is made, with the
field's name in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = ("encoder_decoder", "decoder_only")
NORMS = ("ngpt", "rmsnorm")
ACTIVATIONS = ("gelu", "silu")
ROPE_MODES = ("rotate", "ngpt_reference")
DTYPES = ("float32", "bfloat16")  # the compute dtype; parameters and optimizer state stay float32
MIN_BPE_VOCAB = 256 + 3  # a BPE vocabulary holds every byte and the pad/bos/eos specials
LOSS_CEILING_FACTOR = 2.0  # default divergence ceiling: twice the loss of a uniform prediction
MAX_SEED = 2**63 - 1  # the largest seed every generator takes (jax.random.key, torch.manual_seed)
REMATS = ("none", "block")  # activation checkpointing: keep every activation, or recompute per block


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def microbatch_rows(rows: int, grad_accum: int, what: str = "batch") -> int:
    """Rows of each of the `grad_accum` microbatches of a batch of `rows` rows: the one check
    that they divide, for the config and both frameworks' microbatch splits."""
    if rows % grad_accum:
        raise ConfigError(f"{what} of {rows} rows is not divisible by grad_accum={grad_accum}")
    return rows // grad_accum


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "encoder_decoder"
    norm: str = "ngpt"
    vocab_size: int = 259
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    mlp_hidden: int = 0  # 0 means 4 * d_model
    activation: str = "gelu"
    max_len_encoder: int = 256
    max_len_decoder: int = 256
    rope_base: float = 10000.0
    rope_mode: str = "rotate"  # "ngpt_reference": the reference code's transform, import only
    base_scale: float = 0.0  # 0 means 1/sqrt(d_model) for ngpt, 0.02 for rmsnorm
    pad_id: int = 0  # masked key, ignored label, never generated: no real token may use it
    bos_id: int | None = 1  # None: no start token (decoder_only only; an empty prompt is refused)
    eos_id: int | None = 2  # None: no stop token (generation runs to max_new_tokens)
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self) -> None:
        _check_finite_floats(self)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("remat", self.remat, REMATS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("rope_mode", self.rope_mode, ROPE_MODES)
        for name in ("vocab_size", "d_model", "n_heads", "n_decoder_layers", "max_len_encoder",
                     "max_len_decoder"):
            _check_positive(name, getattr(self, name))
        if self.arch == "encoder_decoder":
            _check_positive("n_encoder_layers", self.n_encoder_layers)
        if self.mlp_hidden < 0:
            raise ConfigError(f"mlp_hidden must be >= 0 (0 means 4*d_model), got {self.mlp_hidden}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(
                f"head dim d_model/n_heads = {self.head_dim} must be even for RoPE "
                f"(d_model={self.d_model}, n_heads={self.n_heads})")
        if self.rope_base <= 0:
            raise ConfigError(f"rope_base must be > 0, got {self.rope_base}")
        if self.base_scale < 0:
            raise ConfigError(f"base_scale must be >= 0 (0 means the norm's default), "
                              f"got {self.base_scale}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if value is None and name != "pad_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer token id, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside [0, vocab_size={self.vocab_size})")
            if name != "pad_id" and value == self.pad_id:
                raise ConfigError(f"{name}={value} equals pad_id: a pad is an invisible key, so "
                                  f"it cannot also be the {name[:3]} token")
        if self.has_encoder and self.bos_id is None:
            raise ConfigError("bos_id=None: an encoder_decoder model starts decoding from bos, "
                              "so it needs a bos_id")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        """F, the gated MLP's hidden width."""
        return self.mlp_hidden or 4 * self.d_model

    @property
    def init_scale(self) -> float:
        """The init std (docs/design.md: 1/sqrt(d) for ngpt, 0.02 for rmsnorm)."""
        if self.base_scale:
            return self.base_scale
        return 1.0 / math.sqrt(self.d_model) if self.norm == "ngpt" else 0.02

    @property
    def has_encoder(self) -> bool:
        return self.arch == "encoder_decoder"


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, data and bookkeeping. `None` means "the norm's default" (docs/design.md)."""

    max_steps: int = 400
    batch_size: int = 16
    grad_accum: int = 1  # microbatches per global batch of batch_size rows
    fsdp: bool = False  # torch under torchrun: FSDP2 (fully_shard) instead of DDP
    compile: bool | None = None  # torch: torch.compile the blocks; None: on with CUDA, off on the CPU
    seq_len: int = 64  # decoder length (decoder_only: the window is seq_len + 1 tokens)
    enc_len: int = 0  # encoder length for encoder_decoder; 0 means seq_len
    lr: float | None = None  # ngpt 15e-4, rmsnorm 6e-4
    min_lr: float = 0.0
    warmup_steps: int | None = None  # ngpt 0, rmsnorm 100
    weight_decay: float | None = None  # ngpt 0, rmsnorm 0.1 (matrices only)
    decay_steps: int = 0  # cosine horizon; 0 means max_steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    data: str = "stdlib"
    text_field: str = "text"  # the column of a `datasets` source that holds the text
    tokenizer: str = "byte"  # "byte", "bpe" or the path of a Hugging Face tokenizer.json
    bpe_vocab_size: int = 1024
    val_percent: float = 5.0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 10
    analysis_every: int = 100  # TensorBoard dynamics (tnt/dynamics.py); 0 disables
    sample_tokens: int = 64
    max_loss: float | None = None  # divergence ceiling; None: RunConfig.loss_ceiling; 0 disables
    sample_temperature: float = 0.8  # end-of-run sample; 0 is greedy (which a small model repeats)
    eval_tasks: str = ""  # lm-evaluation-harness tasks "T1,T2" run at each validation ("": none)
    eval_tasks_limit: float = 100  # documents per task (a fraction if < 1; 0: all of them)
    eval_tasks_path: str = ""  # a folder of local task YAML files (lm_eval's include_path)

    def __post_init__(self) -> None:
        _check_finite_floats(self)
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches",
                     "ckpt_every", "keep_checkpoints", "log_every", "bpe_vocab_size"):
            _check_positive(name, getattr(self, name))
        for name in ("enc_len", "decay_steps", "sample_tokens", "analysis_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be >= 0, got {self.seed}" if self.seed < 0 else
                              f"seed must be at most 2**63 - 1 = {MAX_SEED}, got {self.seed}")
        if self.eps <= 0:
            raise ConfigError(f"eps must be > 0 (Adam divides by sqrt(v) + eps, and v is 0 for a "
                              f"parameter without gradient), got {self.eps}")
        if self.bpe_vocab_size < MIN_BPE_VOCAB:
            raise ConfigError(f"bpe_vocab_size must be at least {MIN_BPE_VOCAB} (the 256 bytes and "
                              f"3 special tokens), got {self.bpe_vocab_size}")
        if self.max_loss is not None and self.max_loss < 0:
            raise ConfigError(f"max_loss must be >= 0 (0 disables the ceiling), got {self.max_loss}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.min_lr < 0:
            raise ConfigError(f"min_lr must be >= 0, got {self.min_lr}")
        if self.sample_temperature < 0:  # infinities are refused with every float field
            raise ConfigError(f"sample_temperature must be >= 0 (0 is greedy), got {self.sample_temperature}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true, false or none (auto), got {self.compile!r}")
        if self.compile and self.fsdp:
            raise ConfigError("compile=true is not supported with fsdp=true: FSDP2's per-block "
                              "hooks under torch.compile are untested here; use compile=false "
                              "(or none) with fsdp, or DDP with compile")
        microbatch_rows(self.batch_size, self.grad_accum, "batch_size")
        if self.tokenizer not in ("byte", "bpe") and not self.tokenizer.endswith(".json"):
            raise ConfigError(f"tokenizer must be byte, bpe or the path of a tokenizer.json, "
                              f"got {self.tokenizer!r}")
        if self.eval_tasks_limit < 0:
            raise ConfigError(f"eval_tasks_limit must be >= 0 (0: every document), "
                              f"got {self.eval_tasks_limit}")
        if self.eval_tasks and not all(t.strip() for t in self.eval_tasks.split(",")):
            raise ConfigError(f"eval_tasks must be task names separated by commas, got {self.eval_tasks!r}")
        if not 0 < self.val_percent < 100:
            raise ConfigError(f"val_percent must be in (0, 100), got {self.val_percent}")
        if not self.text_field:
            raise ConfigError("text_field must name a column of the dataset, got ''")

    def check_rows_split(self, shards: int, over: str) -> None:
        """Each of `shards` (data-parallel devices or ranks, described by `over`) takes an equal
        share of every microbatch's rows."""
        rows = microbatch_rows(self.batch_size, self.grad_accum)
        if rows % shards:
            raise ConfigError(f"the batch of {rows} rows (batch_size={self.batch_size} / "
                              f"grad_accum={self.grad_accum}) does not split over {over}")

    @property
    def task_names(self) -> list[str]:
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]

    @property
    def encoder_len(self) -> int:
        return self.enc_len or self.seq_len

    @property
    def horizon(self) -> int:
        return self.decay_steps or self.max_steps

    def resolved(self, norm: str) -> TrainConfig:
        """The same config with every `None` replaced by the norm's default (docs/design.md)."""
        ngpt = norm == "ngpt"
        return dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else (15e-4 if ngpt else 6e-4),
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else (0 if ngpt else 100),
            weight_decay=self.weight_decay if self.weight_decay is not None else (0.0 if ngpt else 0.1),
        )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        m, t = self.model, self.train
        if t.seq_len > m.max_len_decoder:
            raise ConfigError(
                f"seq_len={t.seq_len} exceeds the model's max_len_decoder={m.max_len_decoder}")
        if m.has_encoder and t.encoder_len > m.max_len_encoder:
            raise ConfigError(
                f"enc_len={t.encoder_len} exceeds the model's max_len_encoder={m.max_len_encoder}")

    @property
    def loss_ceiling(self) -> float:
        """The train loss that stops a run as diverged (0: no ceiling): `max_loss`, by default
        LOSS_CEILING_FACTOR times ln(vocab_size), the loss of a uniform prediction, which an
        initialized model starts near and a learning one only goes below."""
        if self.train.max_loss is not None:
            return self.train.max_loss
        return LOSS_CEILING_FACTOR * math.log(self.model.vocab_size)

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(model=model_config_from_dict(d["model"]),
                   train=_from_dict(TrainConfig, d["train"], "train"))


def model_config_from_dict(d: dict) -> ModelConfig:
    return _from_dict(ModelConfig, d, "model")


def _from_dict(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {where} config field(s): "
                          + ", ".join(repr(n) + did_you_mean(n, names) for n in unknown))
    return cls(**d)


def did_you_mean(name: str, choices) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Presets: the CPU default and GPU-sized shapes up to the nGPT paper's 0.5B and 1B models
# (24 layers x d 1024 x 16 heads; 36 layers x d 1280 x 20 heads, context 4096 in the paper).
# The vocabulary comes from the run's tokenizer, and with it the size: the paper's 0.5B and 1B
# assume LLaMA-2's 32k vocabulary (468.5M and 1,026.2M parameters with its appended pad); the
# default byte tokenizer gives 403.5M and 944.9M (`python -m experiments.plan` prints the count).
# The GPU presets compute in bfloat16 with the remat and microbatch (batch_size / grad_accum)
# that `tnt.memory.choose_microbatch` picks for flash attention with a 10% margin (GPU_DEVICES):
# gpu-small one 80 GB GPU, ngpt-0.5b and ngpt-1b one 141 GB H200 (tests/test_memory.py).
PRESETS: dict[str, dict[str, object]] = {
    "cpu": {},
    "cpu-tiny": {"d_model": 64, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1,
                 "max_steps": 50, "batch_size": 8, "seq_len": 32},
    "gpu-small": {"d_model": 768, "n_heads": 12, "n_encoder_layers": 6, "n_decoder_layers": 6,
                  "max_len_encoder": 1024, "max_len_decoder": 1024, "seq_len": 512,
                  "dtype": "bfloat16", "batch_size": 64, "grad_accum": 1, "max_steps": 20000,
                  "eval_every": 500, "ckpt_every": 2000},
    "ngpt-0.5b": {"arch": "decoder_only", "d_model": 1024, "n_heads": 16, "n_decoder_layers": 24,
                  "max_len_encoder": 4096, "max_len_decoder": 4096, "seq_len": 4096,
                  "dtype": "bfloat16", "batch_size": 128, "grad_accum": 8, "max_steps": 100000,
                  "eval_every": 1000, "ckpt_every": 5000},
    "ngpt-1b": {"arch": "decoder_only", "d_model": 1280, "n_heads": 20, "n_decoder_layers": 36,
                "max_len_encoder": 4096, "max_len_decoder": 4096, "seq_len": 4096,
                "dtype": "bfloat16", "batch_size": 128, "grad_accum": 16, "max_steps": 100000,
                "eval_every": 1000, "ckpt_every": 5000},
}


# (bytes of device memory, margin) each GPU preset is sized for
GPU_DEVICES: dict[str, tuple[float, float]] = {"gpu-small": (80e9, 0.1), "ngpt-0.5b": (141e9, 0.1),
                                               "ngpt-1b": (141e9, 0.1)}

# Peak learning rates per norm where a preset's measured optimum differs from the paper's
# (15e-4 nGPT, 6e-4 baseline, which the paper-scale presets keep): chosen by the compare sweep that
# docs/results.md records. A run's config stores the rate it used.
PRESET_LRS: dict[str, dict[str, float]] = {
    "cpu": {"ngpt": 8e-3, "rmsnorm": 2e-3},
}


def build_run_config(preset: str = "cpu", overrides: dict[str, object] | None = None,
                     sets: list[str] | tuple[str, ...] = (), base: dict[str, object] | None = None
                     ) -> RunConfig:
    """A RunConfig from a base (`read_config_file`), a preset, typed overrides (e.g. from flags)
    and `field=value` strings.

    Field names are unique across ModelConfig and TrainConfig, so `d_model=256` and
    `model.d_model=256` both work. Later sources win: base < preset < overrides < sets.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values: dict[str, object] = {**(base or {}), **PRESETS[preset]}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for item in sets:
        name, value = parse_set(item)
        values[name] = value
    if "lr" not in values and "lr" not in (overrides or {}) and preset in PRESET_LRS:
        # an explicit lr=None (a saved config being resumed) keeps the norm's default
        norm = values.get("norm", ModelConfig.norm)
        values.update({"lr": PRESET_LRS[preset][norm]} if norm in PRESET_LRS[preset] else {})
    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_kw, train_kw = {}, {}
    for name, value in values.items():
        if name in model_fields:
            model_kw[name] = _coerce(name, value, model_fields[name])
        elif name in train_fields:
            train_kw[name] = _coerce(name, value, train_fields[name])
        else:
            raise ConfigError(f"unknown config field {name!r}"
                              + did_you_mean(name, [*model_fields, *train_fields]))
    return RunConfig(model=ModelConfig(**model_kw), train=TrainConfig(**train_kw))


def read_config_file(path: str | Path) -> dict[str, object]:
    """The fields of a config file: a run's `config.json` (`{"model": {...}, "train": {...}}`) or a
    JSON or YAML file of fields, flat or in those two sections; names are checked when it is built."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror or e}") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path} is YAML, which needs PyYAML: pip install pyyaml "
                              f"(or write the config as JSON)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--config {path} is not valid JSON ({e}); a YAML file needs a "
                              f".yaml or .yml name") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of config fields, not "
                          f"{type(data).__name__}")
    values: dict[str, object] = {}
    for name, value in data.items():
        if name in ("model", "train") and isinstance(value, dict):
            values.update(value)
        else:
            values[name] = value
    return {field_name(str(k)): v for k, v in values.items()}


def parse_set(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set expects field=value, got {item!r}")
    name, value = item.split("=", 1)
    return field_name(name), value.strip()


def field_name(name: str) -> str:
    """`d_model` for `d_model`, `model.d_model` and `train.`-prefixed names."""
    name = name.strip()
    for prefix in ("model.", "train."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(name: str, value: object, f: dataclasses.Field) -> object:
    if not isinstance(value, str):
        return value
    hints = typing.get_type_hints(ModelConfig if f.name in ModelConfig.__dataclass_fields__
                                  else TrainConfig)
    kind = hints[f.name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value.lower() == "none":
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            return _BOOLS[value.lower()]
        return kind(value)
    except (KeyError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {kind.__name__}"
                          + (" (true or false)" if kind is bool else "")) from None


def _check_finite_floats(config: object) -> None:
    """Refuse NaN and infinities in every float field: `lr=nan` would pass every `<=` test
    below and train NaN."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
