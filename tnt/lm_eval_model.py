"""The lm-evaluation-harness model `tnt`: any TnT checkpoint of either backend, both archs.

Importing this module registers the model with lm_eval (`lm_eval` is the `eval` extra). lm-eval
offers no plugin hook through which an installed package adds a model to its own `lm_eval` command,
so the package installs `tnt-lm-eval`, which is `lm_eval` with `tnt` registered:

    tnt-lm-eval --model tnt --model_args run=RUN,backend=jax --tasks arc_easy

Python users call `lm_eval.simple_evaluate(model=TnTLM(run=RUN), ...)` or import this module and
pass `model="tnt"`. The scoring rules are `tnt.harness`'s; the framework computes only the label
log-probabilities (`tnt_jax.score`, `tnt_torch.score`) and generates (`generate`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from tnt import harness
from tnt.checkpoint_io import newest_readable
from tnt.checkpoint_meta import CheckpointError
from tnt.generation import Sampling, check_tokenizer

FRAMEWORKS = ("jax", "torch")
DEFAULT_BATCH = 16
DEFAULT_GEN_TOKENS = 256


@dataclass(frozen=True)
class Framework:
    """One framework's model loader, label scorer and generator, by name."""

    name: str
    load_checkpoint: Any
    label_logprobs: Any
    generate: Any

    @classmethod
    def named(cls, name: str) -> Framework:
        if name not in FRAMEWORKS:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(FRAMEWORKS)}")
        package = importlib.import_module(f"tnt_{name}")
        return cls(name, package.load_checkpoint, importlib.import_module(f"tnt_{name}.score").label_logprobs,
                   importlib.import_module(f"tnt_{name}.generate").generate)


def load(run: str | Path, backend: str | None = None):
    """(model, RunConfig, tokenizer, Framework, step folder) of the newest readable checkpoint under
    `run`, in `backend` (default: the framework that wrote it)."""
    def read(step_dir: Path, kind: str):
        fw = Framework.named(backend or kind)
        return (*fw.load_checkpoint(step_dir), fw, step_dir)

    return newest_readable(run, read)


def _batch_size(value) -> int:
    """lm_eval passes an int, a numeric string or "auto"; "auto" is the default size."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return size


@register_model("tnt")
class TnTLM(TemplateLM):
    """A TnT model for lm-evaluation-harness: `run=RUN` (a run dir, its checkpoints folder or a step
    folder) and `backend=jax|torch`, or an already built `model` with its `tokenizer` (training)."""

    def __init__(self, run: str | None = None, backend: str | None = None, batch_size=DEFAULT_BATCH,
                 max_gen_toks: int = DEFAULT_GEN_TOKENS, model=None, tokenizer=None,
                 device: str | None = None, max_batch_size=None, **unused) -> None:
        super().__init__()
        if unused:
            raise ValueError(f"unknown model_args for tnt: {', '.join(sorted(unused))} (it takes run, "
                             f"backend, batch_size, max_gen_toks)")
        if (run is None) == (model is None):
            raise ValueError("give the tnt model either run=RUN (a checkpoint) or a built model")
        if model is None:
            model, cfg, tokenizer, fw, self.step_dir = load(run, backend)
            if tokenizer is None:
                raise CheckpointError(f"checkpoint {self.step_dir} carries no tokenizer (imported "
                                      f"weights); the harness needs text")
        else:
            if backend is None or tokenizer is None:
                raise ValueError("a built model needs its backend and tokenizer")
            fw, cfg, self.step_dir = Framework.named(backend), None, None
        check_tokenizer(tokenizer, model.cfg)
        if device is not None and fw.name == "torch" and device != "cpu":
            model = model.to(device)
        self.model, self.run_config, self.tokenizer, self.framework = model, cfg, tokenizer, fw
        self.cfg = model.cfg
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        # TemplateLM encodes context and continuation together ("causal") or apart ("seq2seq")
        self.backend = "seq2seq" if self.cfg.has_encoder else "causal"

    # --- tokens ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.cfg.eos_id if self.cfg.eos_id is not None else harness.prefix_id(self.cfg)

    @property
    def prefix_token_id(self) -> int:
        return harness.prefix_id(self.cfg)

    @property
    def max_length(self) -> int:
        return self.cfg.max_len_decoder

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(string)]

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    # --- requests -------------------------------------------------------------------------------

    def _score(self, batch):
        return self.framework.label_logprobs(self.model, batch)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="tnt loglikelihood") as bar:
            return harness.loglikelihoods(self._score, self.cfg, pairs, self.batch_size, bar.update)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self.tok_encode(r.args[0]) for r in requests]
        with tqdm(disable=disable_tqdm, desc="tnt rolling windows") as bar:
            return harness.rolling_loglikelihoods(self._score, self.cfg, texts, self.batch_size,
                                                  bar.update)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the request samples (`do_sample` or a temperature > 0); each text is cut at
        the first of its stop strings (`until`) and holds at most `max_gen_toks` tokens."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="tnt generate_until")
        for key, members in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = _sampling(kwargs)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) for i in chunk]
                made = self.framework.generate(self.model, prompts, n, sampling, warn=False)
                for i, tokens in zip(chunk, made.tokens, strict=True):
                    out[i] = harness.cut_at_stop(self.tokenizer.decode(tokens), until)
                bar.update(len(chunk))
        bar.close()
        return out

    def get_model_info(self) -> dict:
        info = {"framework": self.framework.name, "arch": self.cfg.arch, "norm": self.cfg.norm}
        if self.step_dir is not None:
            info["checkpoint"] = str(self.step_dir)
        return info


def _sampling(kwargs: dict) -> Sampling:
    """The harness's generation kwargs as a `Sampling`: greedy unless `do_sample` or a temperature
    asks to sample (`do_sample` alone samples at temperature 1)."""
    do_sample, t = kwargs.get("do_sample"), kwargs.get("temperature")
    temperature = 0.0 if do_sample is False else float(t if t is not None else (1.0 if do_sample else 0.0))
    return Sampling(temperature, int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0),
                    int(kwargs.get("seed") or 0))


def cli() -> None:
    """`tnt-lm-eval`: lm_eval's command with the `tnt` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

