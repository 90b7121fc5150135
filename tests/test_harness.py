"""The lm-evaluation-harness model `tnt` (tnt/lm_eval_model.py, tnt/harness.py): every request's
value against the model's own loss, both frameworks and both archs, batched against one by one,
generation against `inference`, and local tasks through `lm_eval.simple_evaluate`, offline."""

from __future__ import annotations

import json
import math
import sys
from functools import partial

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the harness model needs the 'eval' extra")

from lm_eval.api.instance import Instance  # noqa: E402

from tnt import harness  # noqa: E402
from tnt.checkpoint_meta import make_meta  # noqa: E402
from tnt.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from tnt.generation import GREEDY  # noqa: E402
from tnt.lm_eval_model import TnTLM, run_tasks  # noqa: E402
from tnt.tokenizer import ByteTokenizer  # noqa: E402
from tnt_jax.model import loss_fn as jax_loss_fn  # noqa: E402
from tnt_jax.model import merge_params, split_params  # noqa: E402

ARCHS = ("decoder_only", "encoder_decoder")
BACKENDS = ("jax", "torch")
MAX_LEN = 24


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny byte-level checkpoint per arch (random weights, written in the torch layout, which
    both frameworks load)."""
    import torch

    from tnt_torch import checkpoint
    from tnt_torch.model import TnT, to_canonical

    root = tmp_path_factory.mktemp("harness_runs")
    for arch in ARCHS:
        cfg = RunConfig(ModelConfig(arch=arch, vocab_size=259, d_model=32, n_heads=2, n_encoder_layers=1,
                                    n_decoder_layers=1, max_len_encoder=MAX_LEN, max_len_decoder=MAX_LEN),
                        TrainConfig(seq_len=8, batch_size=2))
        torch.manual_seed(0)
        checkpoint.save(root / arch / "checkpoints", 1, to_canonical(TnT(cfg.model)), {},
                        make_meta("torch", 1, cfg, ByteTokenizer().spec))
    return root


@pytest.fixture(scope="module")
def lms(runs):
    return {(arch, b): TnTLM(run=str(runs / arch), backend=b) for arch in ARCHS for b in BACKENDS}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A multiple-choice and a perplexity task, YAML + jsonl, for `include_path`."""
    root = tmp_path_factory.mktemp("tasks")
    mc = [{"question": f"Q{i}: 2+{i}=", "choices": [f" {2 + i}", " x", " yes!"], "answer": i % 3}
          for i in range(5)]
    ppl = [{"text": f"def f{i}(x):\n    return x * {i}\n" * (i + 1)} for i in range(3)]
    for name, rows in (("mc", mc), ("ppl", ppl)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {root}/"
    (root / "mc.yaml").write_text(
        f"task: tiny_mc\n{common}mc.jsonl\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_target: '{{answer}}'\ndoc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n")
    (root / "ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}ppl.jsonl\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n  - metric: word_perplexity\n")
    return root, mc, ppl


def token_requests(rng) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token ids: short, empty-context-like, and longer than the model."""
    def ids(n):
        return [int(t) for t in rng.integers(3, 259, n)]

    return [(ids(5), ids(3)), (ids(1), ids(1)), (ids(12), ids(7)), (ids(40), ids(4)), (ids(3), ids(MAX_LEN)),
            (ids(20), ids(10)), (ids(2), ids(15))]


def reference_batch(cfg: ModelConfig, ctx: list[int], cont: list[int]) -> dict[str, np.ndarray]:
    """The training-shaped batch that scores `cont` after `ctx`, written out for the test."""
    if cfg.has_encoder:
        return {"enc_tokens": np.array([ctx[-cfg.max_len_encoder:]], np.int32),
                "dec_tokens": np.array([[cfg.bos_id] + cont[:-1]], np.int32),
                "labels": np.array([cont], np.int32)}
    seq = (ctx + cont)[-(cfg.max_len_decoder + 1):]
    labels = [cfg.pad_id] * (len(seq) - 1 - len(cont)) + cont
    return {"dec_tokens": np.array([seq[:-1]], np.int32), "labels": np.array([labels], np.int32)}


@partial(jax.jit, static_argnums=0)
def _jax_forward(graphdef, params, batch):
    model = merge_params(graphdef, params)
    return jax_loss_fn(model, batch), model(batch.get("enc_tokens"), batch["dec_tokens"])


def forward(lm: TnTLM, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """(minus the summed label losses of the framework's `loss_fn`, the logits) of one batch,
    padded to the model's lengths (pad labels and keys count for nothing; JAX compiles once)."""
    cfg = lm.cfg
    padded = {}
    for k, v in batch.items():
        width = cfg.max_len_encoder if k == "enc_tokens" else cfg.max_len_decoder
        padded[k] = np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=cfg.pad_id)
    if lm.framework.name == "jax":
        (loss, count), logits = _jax_forward(*split_params(lm.model), padded)
    else:
        import torch

        from tnt_torch.model import loss_fn

        b = {k: torch.as_tensor(v, dtype=torch.long) for k, v in padded.items()}
        with torch.no_grad():
            (loss, count), logits = loss_fn(lm.model, b), lm.model(b.get("enc_tokens"), b["dec_tokens"])
    return -float(loss) * int(count), np.array(logits)[:, :batch["labels"].shape[1]]


def scored(lm: TnTLM, requests) -> list[tuple[float, bool]]:
    return lm._loglikelihood_tokens([(("", ""), c, x) for c, x in requests], disable_tqdm=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loglikelihood_is_minus_the_summed_loss_and_is_greedy_the_argmax(lms, arch, backend):
    lm = lms[arch, backend]
    cfg = lm.cfg
    requests = token_requests(np.random.default_rng(1))
    greedy = lm.framework.generate(lm.model, [requests[0][0]], 6, GREEDY, warn=False).tokens[0]
    requests.append((requests[0][0], [int(t) for t in greedy]))  # the model's own greedy answer
    for (ctx, cont), (value, is_greedy) in zip(requests, scored(lm, requests), strict=True):
        batch = reference_batch(cfg, ctx, cont)
        expected, logits = forward(lm, batch)
        assert value == pytest.approx(expected, rel=1e-5), (ctx, cont)
        logits[..., cfg.pad_id] = -np.inf
        at = batch["labels"][0] != cfg.pad_id
        assert is_greedy == bool((logits[0].argmax(-1)[at] == batch["labels"][0][at]).all())
    assert scored(lm, requests[-1:])[0][1], "the greedy continuation is greedy"


@pytest.mark.parametrize("arch", ARCHS)
def test_backends_agree_and_batches_equal_one_by_one(lms, arch):
    requests = token_requests(np.random.default_rng(2))
    values = {}
    for backend in BACKENDS:
        lm = lms[arch, backend]
        batched = scored(lm, requests)
        lm.batch_size = 1
        try:
            single = scored(lm, requests)
        finally:
            lm.batch_size = 16
        for (a, ga), (b, gb) in zip(batched, single, strict=True):
            assert a == pytest.approx(b, rel=1e-5) and ga == gb
        values[backend] = batched
    for (a, ga), (b, gb) in zip(values["jax"], values["torch"], strict=True):
        assert a == pytest.approx(b, rel=1e-5) and ga == gb


def test_rolling_windows_cover_every_token_once_with_the_preceding_text():
    cfg = ModelConfig(arch="decoder_only", vocab_size=259, d_model=32, n_heads=2, n_decoder_layers=1,
                      max_len_decoder=8)
    tokens = list(range(3, 3 + 21))
    windows = harness.rolling_requests(cfg, tokens)
    assert [len(t) for _, t in windows] == [8, 8, 5]
    assert [int(t) for _, targets in windows for t in targets] == tokens
    for ctx, targets in windows:  # all the text before the targets, after the prefix token
        start = len(ctx) - 1
        assert [int(t) for t in ctx] == [cfg.bos_id] + tokens[:start]
        assert [int(t) for t in targets] == tokens[start:start + len(targets)]
        lay = harness.layout(cfg, ctx, targets)  # what fits: the last window gets 3 tokens of context
        assert len(lay.dec) == min(len(ctx) + len(targets) - 1, cfg.max_len_decoder)
    assert harness.rolling_requests(cfg, []) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_rolling_loglikelihood_sums_its_windows(lms, arch):
    lm = lms[arch, "torch"]
    text = "def rolling(x):\n    return x\n"  # 30 byte tokens: two windows of 24
    toks = lm.tok_encode(text)
    [rolled] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                        disable_tqdm=True)
    prefix = [lm.prefix_token_id]
    by_hand = scored(lm, [(prefix + toks[:s], toks[s:s + MAX_LEN]) for s in range(0, len(toks), MAX_LEN)])
    assert rolled == pytest.approx(sum(v for v, _ in by_hand), rel=1e-6)
    short = "abc"
    [one] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)], disable_tqdm=True)
    [(whole, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("", short), 0)], disable_tqdm=True)
    assert one == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_until_is_inference_cut_at_the_stop_string(lms, arch, backend):
    import importlib

    lm = lms[arch, backend]
    inference = importlib.import_module(f"tnt_{backend}").inference
    prompts = ["def f(x):", "Hello", "The cat"]
    full = inference(lm.model, lm.tokenizer, prompts, max_length=10)

    def until(stops):
        reqs = [Instance("generate_until", {}, (p, {"until": stops, "max_gen_toks": 10}), i)
                for i, p in enumerate(prompts)]
        return lm.generate_until(reqs, disable_tqdm=True)

    assert until([]) == full
    stop = max(full, key=len)[1:3]
    assert len(stop) == 2, "the random model made at least 3 characters"
    cut = until([stop, "never-made"])
    assert cut == [text[:text.index(stop)] if stop in text else text for text in full]
    assert any(c != f for c, f in zip(cut, full, strict=True))


def test_a_continuation_longer_than_the_decoder_is_refused(lms):
    with pytest.raises(harness.HarnessError, match="does not fit"):
        scored(lms["decoder_only", "torch"], [([5], [7] * (MAX_LEN + 1))])


@pytest.mark.parametrize("arch", ARCHS)
def test_local_tasks_through_simple_evaluate_match_the_requests(lms, tasks, arch):
    root, mc, ppl = tasks
    found = {}
    for backend in BACKENDS:
        lm = lms[arch, backend]
        found[backend] = run_tasks(lm, ["tiny_mc", "tiny_ppl"], include_path=str(root))
        assert "tiny_mc" in found[backend]["table"] and "bits_per_byte" in found[backend]["table"]
        # the harness's acc is the argmax of our loglikelihoods over the choices
        hits = []
        for i, doc in enumerate(mc):
            reqs = [Instance("loglikelihood", {}, (doc["question"], c), i) for c in doc["choices"]]
            values = [v for v, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
            hits.append(int(np.argmax(values)) == doc["answer"])
        assert found[backend]["tasks"]["tiny_mc"]["acc"] == pytest.approx(np.mean(hits))
        # and its bits per byte the rolling loglikelihoods over the texts' bytes
        reqs = [Instance("loglikelihood_rolling", {}, (d["text"],), i) for i, d in enumerate(ppl)]
        nats = -sum(lm.loglikelihood_rolling(reqs, disable_tqdm=True))
        n_bytes = sum(len(d["text"].encode()) for d in ppl)
        assert found[backend]["tasks"]["tiny_ppl"]["bits_per_byte"] == pytest.approx(
            nats / n_bytes / math.log(2), rel=1e-6)
    assert found["jax"]["tasks"]["tiny_mc"] == found["torch"]["tasks"]["tiny_mc"]
    assert found["jax"]["tasks"]["tiny_ppl"]["bits_per_byte"] == pytest.approx(
        found["torch"]["tasks"]["tiny_ppl"]["bits_per_byte"], rel=1e-5)


def test_evaluate_cli_runs_tasks_and_names_the_missing_extra(runs, tasks, capsys, monkeypatch):
    from experiments.evaluate import main as evaluate_main

    root, _, _ = tasks
    argv = [str(runs / "decoder_only"), "--tasks", "tiny_mc", "--include-path", str(root), "--limit", "2"]
    assert evaluate_main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"tiny_mc"} and 0 <= out["tasks"]["tiny_mc"]["acc"] <= 1
    assert evaluate_main(argv[:1]) == 2
    assert "give --data" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "tnt.lm_eval_model")
    for name in [m for m in sys.modules if m.split(".")[0] == "lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if lm-eval were not installed
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "pip install 'tnt[eval]'" in err and "\n" == err[-1]


def test_tnt_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("tnt") is TnTLM


def test_eval_tasks_during_training_log_downstream_metrics(corpus, tasks, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from experiments.pretrain import main as pretrain_main

    root, _, _ = tasks
    argv = ["--backend", "torch", "--preset", "cpu-tiny", "--max-steps", "2", "--seq-len", "8",
            "--data", corpus, "--eval-every", "1", "--set", "eval_batches=1", "--set", "sample_tokens=0",
            "--set", "analysis_every=0", "--set", "eval_tasks=tiny_mc,tiny_ppl",
            "--set", f"eval_tasks_path={root}", "--set", "eval_tasks_limit=2"]
    assert pretrain_main(argv + ["--out", str(tmp_path / "run")]) == 0
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    for tag in ("downstream/tiny_mc/acc", "downstream/tiny_ppl/bits_per_byte"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    assert all(0 <= e.value <= 1 for e in acc.Scalars("downstream/tiny_mc/acc"))
    assert "tiny_mc acc" in capsys.readouterr().out
    assert pretrain_main(argv[:-2] + ["--set", "eval_tasks_limit=-1", "--out", str(tmp_path / "bad")]) == 2
    assert "eval_tasks_limit must be >= 0" in capsys.readouterr().err


def test_bench_harness_reports_requests_per_second_per_batch_size(capsys):
    from experiments import bench

    code = bench.main(["harness", "--backend", "torch", "--preset", "cpu-tiny", "--arch", "decoder_only",
                       "--requests", "6", "--context-len", "8", "--batch-sizes", "1,4", "--repeats", "1"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "torch" and r["requests"] == 6 and set(r["batch_sizes"]) == {"1", "4"}
    rates = {k: v["requests_per_s"] for k, v in r["batch_sizes"].items()}
    assert all(v > 0 for v in rates.values())
    assert r["batching_speedup"] == pytest.approx(rates["4"] / rates["1"])
    assert bench.main(["harness", "--batch-sizes", "0,4"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_the_hf_model_of_an_exported_run_gives_tnts_loglikelihoods(runs, lms, arch, tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the export needs the 'hf' extra")
    from lm_eval.models.huggingface import HFLM

    from experiments.export import export

    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = export(runs / arch, tmp_path / "exported")
    hf = HFLM(pretrained=str(out), trust_remote_code=True, batch_size=4, device="cpu",
              backend="seq2seq" if arch == "encoder_decoder" else "causal")
    pairs = [("The cat", " sat"), ("Hello", " world!"), ("x = 1 +", " 2"), ("def f(x):", "\n    return x")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = hf.loglikelihood(reqs, disable_tqdm=True)
    ours = lms[arch, "torch"].loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(theirs, ours, strict=True):
        assert a == pytest.approx(b, rel=1e-5) and ga == gb
