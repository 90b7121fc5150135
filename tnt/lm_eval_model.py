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

import json
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from tnt import harness
from tnt.backend import backend as backend_module
from tnt.checkpoint_io import newest_readable
from tnt.checkpoint_meta import CheckpointError
from tnt.generation import Sampling, check_tokenizer

DEFAULT_BATCH = 16
DEFAULT_GEN_TOKENS = 256


def load(run: str | Path, backend: str | None = None):
    """(Loaded model, the backend module, step folder) of the newest readable checkpoint under `run`,
    in `backend` (default: the framework that wrote it)."""
    if backend is not None:
        backend_module(backend)  # an unknown or missing framework fails before any reading

    def read(step_dir: Path, kind: str):
        fw = backend_module(backend or kind)
        return fw.load(step_dir), fw, step_dir

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
            loaded, fw, self.step_dir = load(run, backend)
            model, cfg, tokenizer = loaded.model, loaded.cfg, loaded.tokenizer
            if tokenizer is None:
                raise CheckpointError(f"checkpoint {self.step_dir} carries no tokenizer (imported "
                                      f"weights); the harness needs text")
        else:
            if backend is None or tokenizer is None:
                raise ValueError("a built model needs its backend and tokenizer")
            fw, cfg, self.step_dir = backend_module(backend), None, None
        check_tokenizer(tokenizer, model.cfg)
        if device not in (None, "cpu") and fw.name == "torch" and fw.accelerator():
            model = model.to(device)  # lm_eval's CLI asks for "cuda" by default: not on a CPU machine
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


class TaskError(harness.HarnessError):
    """A task name the harness does not know, or task data it cannot load."""


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm_eval's TaskManager for `tasks`: the local folder's tasks alone when they are all there
    (indexing the harness's own ~15k task files takes half a minute), else everything."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise TaskError(f"--include-path {include_path!r} is not a folder of task YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise TaskError(f"unknown task(s) {', '.join(unknown)}: not in lm-eval's tasks"
                        + ("" if include_path is None else f" nor in {include_path}"))
    return manager


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per task, each metric and its stderr (`acc`, `acc_stderr`), from simple_evaluate's results;
    a metric under a filter other than lm_eval's "none" is named `<metric>_<filter>`."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        row = {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if not filt or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            row[name if filt == "none" else f"{name}_{filt}"] = float(value)
        out[task] = row
    return out


def run_tasks(lm: TnTLM, tasks: list[str], limit: float | None = None, num_fewshot: int | None = None,
              include_path: str | None = None, manager=None) -> dict:
    """`tasks` through `lm_eval.simple_evaluate`: {"tasks": metrics per task, "table": lm_eval's
    table}. Hub tasks download their data (set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 with a
    filled cache, or use local tasks in `include_path`: a YAML and a jsonl each)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    if not tasks:
        raise TaskError("no task given")
    manager = manager or task_manager(tasks, include_path)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                  verbosity="ERROR")
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise TaskError(f"the data of task(s) {', '.join(tasks)} did not load ({type(e).__name__}: "
                        f"{e}); offline, use local tasks (--include-path) or a filled Hugging Face "
                        f"cache with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1") from e
    return {"tasks": metrics(results), "table": make_table(results)}


class Downstream:
    """`eval_tasks` during training: the tasks run on the current model at each validation and
    their metrics go to TensorBoard as `downstream/<task>/<metric>`. Built before the first step,
    so an unknown task stops the run before it trains."""

    def __init__(self, tasks: list[str], limit: float, include_path: str, framework: str,
                 tokenizer) -> None:
        self.tasks, self.limit = tasks, (limit or None)
        self.include_path = include_path or None
        self.framework, self.tokenizer = framework, tokenizer
        self.manager = task_manager(tasks, self.include_path)

    def __call__(self, model, writer, step: int) -> dict[str, dict[str, float]]:
        lm = TnTLM(model=model, tokenizer=self.tokenizer, backend=self.framework)
        found = run_tasks(lm, self.tasks, self.limit, None, self.include_path, self.manager)["tasks"]
        for task, values in found.items():
            for metric, value in values.items():
                if not metric.endswith("_stderr"):
                    writer.add_scalar(f"downstream/{task}/{metric}", value, step)
        return found


def cli() -> None:
    """`tnt-lm-eval`: lm_eval's command with the `tnt` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    cli()
