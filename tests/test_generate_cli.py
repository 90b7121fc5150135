"""`python -m experiments.generate` on checkpoints of either backend, and
`python -m experiments.bench generate`."""

import io
import json

import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from experiments import bench
from experiments import generate as cli
from tnt.checkpoint_meta import make_meta
from tnt.config import RunConfig, TrainConfig
from tnt.tokenizer import BPETokenizer, ByteTokenizer
from tnt_jax.model import TnT, to_canonical

CFG = tiny_config("decoder_only", "ngpt", vocab_size=259)
RUN = RunConfig(model=CFG, train=TrainConfig(seq_len=16, max_steps=1))


@pytest.fixture(scope="module")
def params():
    return to_canonical(TnT(CFG, nnx.Rngs(2)))


def torch_checkpoint(run_dir, params):
    from tnt_torch import checkpoint

    meta = make_meta("torch", 1, RUN, ByteTokenizer().spec)
    checkpoint.save(run_dir / "checkpoints", 1, params, {}, meta)
    return run_dir


def jax_checkpoint(run_dir, params):
    import jax.numpy as jnp

    from tnt_jax import checkpoint

    manager = checkpoint.open_manager(run_dir / "checkpoints", keep=1)
    state = {"params": {k: jnp.asarray(v) for k, v in params.items()}, "step": jnp.int32(1)}
    checkpoint.save(manager, 1, state, make_meta("jax", 1, RUN, ByteTokenizer().spec))
    manager.wait_until_finished()
    return run_dir


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_checkpoint_of_either_backend_generates_the_same_text_in_either(tmp_path, params,
                                                                          capsys):
    texts = set()
    for writer in (torch_checkpoint, jax_checkpoint):
        run_dir = writer(tmp_path / writer.__name__, params)
        for backend in ("torch", "jax"):
            code, out, err = run_cli(capsys, "--ckpt", run_dir, "--backend", backend,
                                     "--prompt", "ab", "--prompt", "", "--max-new-tokens", 5)
            assert code == 0, err
            texts.add(out)
    assert len(texts) == 1
    out = texts.pop()  # each output under its prompt's header
    assert out.startswith("=== prompt 1: 'ab' ===\n") and "\n\n=== prompt 2: '' ===\n" in out


def test_long_prompts_are_cut_with_a_note_and_interactive_mode_reads_stdin(tmp_path, params,
                                                                           capsys, monkeypatch):
    run_dir = torch_checkpoint(tmp_path, params)
    code, _, err = run_cli(capsys, "--ckpt", run_dir, "--backend", "torch", "--prompt",
                           "x" * 30, "--max-new-tokens", 4)
    assert code == 0 and "note: prompt has 30 tokens" in err and "keeping its last 13" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\n\n/quit\nnever\n"))
    code, out, err = run_cli(capsys, "--ckpt", run_dir, "--backend", "torch", "--interactive",
                             "--max-new-tokens", 3, "--temperature", 0.8, "--top-k", 5)
    assert code == 0 and "/quit or EOF ends" in err
    assert out.count("> ") == 3  # two answers, then /quit


def test_each_interactive_prompt_draws_a_new_seed(tmp_path, params, capsys, monkeypatch):
    run_dir = torch_checkpoint(tmp_path, params)
    seeds = []

    def answer(framework, model, tokenizer, prompts, args, sampling):
        seeds.append(sampling.seed)
        return ["x"] * len(prompts)

    monkeypatch.setattr(cli, "answer", answer)
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\nab\nab\n"))
    code, _, _ = run_cli(capsys, "--ckpt", run_dir, "--backend", "torch", "--interactive",
                         "--temperature", 0.8, "--seed", 5)
    assert code == 0 and seeds == [5, 6, 7]


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused(tmp_path, params, capsys):
    run_dir = torch_checkpoint(tmp_path, params)
    bpe = BPETokenizer.train(["hello world " * 20], vocab_size=262)
    bpe.save(tmp_path / "tokenizer.json")
    code, _, err = run_cli(capsys, "--ckpt", run_dir, "--backend", "torch", "--prompt", "hi",
                           "--tokenizer", tmp_path / "tokenizer.json")
    assert code == 2 and "is not the one" in err and "bpe" in err
    code, _, err = run_cli(capsys, "--ckpt", tmp_path / "nothing", "--prompt", "hi")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_a_seed_no_generator_takes_is_refused_as_pretrain_refuses_it(seed, tmp_path, params, capsys):
    run_dir = torch_checkpoint(tmp_path, params)
    code, out, err = run_cli(capsys, "--ckpt", run_dir, "--backend", "torch", "--prompt", "hi",
                             "--temperature", "0.8", "--seed", seed)
    assert code == 2 and out == ""
    assert err == f"error: seed must be an integer in [0, 2**63 - 1], got {seed}\n"


def test_bench_generate_prints_cached_and_uncached_tokens_per_second(capsys):
    code = bench.main(["generate", "--backend", "torch", "--preset", "cpu-tiny",
                       "--arch", "decoder_only", "--new-tokens", "6", "--prompt-len", "4",
                       "--repeats", "1"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["new_tokens"] == 6 and r["arch"] == "decoder_only"
    assert r["cached"]["tokens_per_s"] > 0 and r["uncached"]["tokens_per_s"] > 0
    assert np.isclose(r["speedup"], r["cached"]["tokens_per_s"] / r["uncached"]["tokens_per_s"])


def test_a_checkpoint_without_a_tokenizer_needs_one_named(tmp_path, params, capsys):
    """Imported weights carry no tokenizer (spec kind "none"): one error line asks for
    --tokenizer, and the named one is then used."""
    from tnt_torch import checkpoint

    meta = make_meta("torch", 1, RUN, {"kind": "none"})
    checkpoint.save(tmp_path / "checkpoints", 1, params, {}, meta)
    code, _, err = run_cli(capsys, "--ckpt", tmp_path, "--backend", "torch", "--prompt", "ab")
    assert code == 2 and err.startswith("error:") and "carries no tokenizer" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "--ckpt", tmp_path, "--backend", "torch", "--prompt", "ab",
                             "--tokenizer", "byte", "--max-new-tokens", 3)
    assert code == 0, err
