"""experiments.export writes a Hugging Face folder that transformers loads (trust_remote_code):
tnt_torch's logits (pad excluded, at -inf), greedy `generate` tokens equal to tnt_torch's
decoding, a tokenizer that encodes as TnT's, and both frameworks read it back exactly. Both archs,
both norms, checkpoints of both backends, byte and BPE tokenizers; offline."""

from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tiny_config

import tnt_jax
import tnt_torch
from experiments import export as cli
from tnt.checkpoint_meta import make_meta
from tnt.config import RunConfig, TrainConfig
from tnt.tokenizer import BPETokenizer, ByteTokenizer
from tnt_torch.generate import generate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of dev")

TEXTS = ["def f(x):\n    return x * 2\n", "class A:\n    pass\n", "héllo wörld, naïve café"]
# (arch, norm, backend that wrote the checkpoint, tokenizer)
CASES = [("decoder_only", "ngpt", "torch", "byte"), ("decoder_only", "rmsnorm", "jax", "bpe"),
         ("encoder_decoder", "ngpt", "jax", "byte"), ("encoder_decoder", "rmsnorm", "torch", "bpe")]


def tokenizer_of(kind):
    return ByteTokenizer() if kind == "byte" else BPETokenizer.train(TEXTS * 4, 300)


def write_checkpoint(run_dir, backend, cfg, tok):
    """A checkpoint of `backend` holding a model with random (seeded) weights."""
    params = tnt_torch.to_canonical(tnt_torch.TnT(cfg, seed=3))
    meta = make_meta(backend, 1, RunConfig(cfg, TrainConfig(seq_len=8)), tok.spec)
    if backend == "torch":
        from tnt_torch import checkpoint

        checkpoint.save(run_dir / "checkpoints", 1, params, {}, meta)
    else:
        from tnt_jax import checkpoint

        manager = checkpoint.open_manager(run_dir / "checkpoints", keep=1)
        state = {"params": {k: jnp.asarray(v) for k, v in params.items()}, "step": jnp.int32(1)}
        checkpoint.save(manager, 1, state, meta)
        manager.wait_until_finished()
    return params


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def exported(request, tmp_path_factory):
    arch, norm, backend, kind = request.param
    tok = tokenizer_of(kind)
    cfg = tiny_config(arch, norm, vocab_size=tok.vocab_size, max_len_decoder=24)
    root = tmp_path_factory.mktemp("export")
    params = write_checkpoint(root / "run", backend, cfg, tok)
    out = cli.export(root / "run", root / "hf")
    net = tnt_torch.load_canonical(tnt_torch.TnT(cfg), params).eval()
    return out, cfg, tok, params, net


def auto_model(out, cfg):
    auto = (transformers.AutoModelForSeq2SeqLM if cfg.has_encoder
            else transformers.AutoModelForCausalLM)
    return auto.from_pretrained(out, trust_remote_code=True).eval()


def left_padded(rows, pad):
    """transformers' batch layout for generation: rows right-aligned, a 0/1 attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.as_tensor(r), 1
    return ids, mask


def test_the_folder_holds_what_transformers_reads(exported):
    out, cfg, _, _, _ = exported
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_tnt.py",
            "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    kind = "Seq2SeqLM" if cfg.has_encoder else "CausalLM"
    assert config["auto_map"][f"AutoModelFor{kind}"] == f"modeling_tnt.TnTFor{kind}"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (
        cfg.bos_id, cfg.eos_id, cfg.pad_id)
    assert (out / "modeling_tnt.py").read_text() == cli.modeling_source().read_text()


def test_transformers_gives_tnt_torch_logits_on_either_padding_side(exported):
    out, cfg, tok, _, net = exported
    model = auto_model(out, cfg)
    rows = [tok.encode(t)[:12] for t in TEXTS]
    pad, V = cfg.pad_id, cfg.vocab_size
    enc_rows = [tok.encode(t)[-10:] for t in reversed(TEXTS)]
    with torch.no_grad():
        for r, row in enumerate(rows):
            ids = torch.as_tensor(row, dtype=torch.long)[None]
            if cfg.has_encoder:
                enc = torch.as_tensor(enc_rows[r], dtype=torch.long)[None]
                want = net(enc, ids)
            else:
                want = net(None, ids)
            ids_l, mask_l = left_padded(rows, pad)
            if cfg.has_encoder:
                enc_l, enc_mask = left_padded(enc_rows, pad)
                got = model(input_ids=enc_l, attention_mask=enc_mask, decoder_input_ids=ids_l,
                            decoder_attention_mask=mask_l).logits
            else:
                got = model(input_ids=ids_l, attention_mask=mask_l).logits
            got = got[r, ids_l.shape[1] - len(row):]
            real = [v for v in range(V) if v != pad]
            assert (got[:, real] - want[0][:, real]).abs().max() <= 1e-5
            assert bool((got[:, pad] == -torch.inf).all())


def test_greedy_generate_equals_tnt_torch_decoding(exported):
    out, cfg, tok, _, net = exported
    model = auto_model(out, cfg)
    prompts = [tok.encode(t)[:n] for t, n in zip(TEXTS, (9, 4, 7), strict=True)]
    n = 8
    want = generate(net, prompts, n).tokens
    ids, mask = left_padded(prompts, cfg.pad_id)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    new = got[:, 1:] if cfg.has_encoder else got[:, ids.shape[1]:]  # seq2seq starts with bos
    for row, w in zip(new.tolist(), want, strict=True):
        cut = row.index(cfg.eos_id) if cfg.eos_id in row else len(row)
        assert row[:cut] == w.tolist()
    assert sum(len(w) for w in want) > 0
    text = tnt_torch.inference(net, tok, TEXTS[0][:9], max_length=n)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    one = hf_tok(TEXTS[0][:9], return_tensors="pt")
    with torch.no_grad():
        got = model.generate(**one, max_new_tokens=n, do_sample=False)
    new = got[0, 1:] if cfg.has_encoder else got[0, one["input_ids"].shape[1]:]
    assert hf_tok.decode(new, skip_special_tokens=True) == text


def test_the_tokenizer_encodes_and_decodes_as_tnt(exported):
    out, cfg, tok, _, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    for text in TEXTS:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text).tolist()
        assert hf_tok.decode(ids) == text == tok.decode(ids)
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (
        cfg.pad_id, cfg.bos_id, cfg.eos_id)


def test_both_frameworks_read_the_folder_back_exactly(exported):
    out, cfg, tok, params, _ = exported
    for framework in (tnt_torch, tnt_jax):
        model, run, got_tok = framework.load_checkpoint(out)
        assert run.model == cfg and got_tok.spec == tok.spec
        back = framework.to_canonical(model)
        assert back.keys() == params.keys()
        for name, value in params.items():
            np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_export_refuses_a_used_folder_a_missing_run_and_a_missing_extra(exported, tmp_path, capsys,
                                                                        monkeypatch):
    out = exported[0]
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli.main([str(out), "--out", str(out)]) == 2  # an export re-exports, not over itself
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --out ") and "not an empty folder" in line
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert cli.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint path ")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    assert cli.main([str(out), "--out", str(tmp_path / "again")]) == 0  # an export exports again
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text())
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    assert cli.main([str(out), "--out", str(tmp_path / "y")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "pip install 'tnt[hf]'" in line


def test_a_checkpoint_without_tokenizer_exports_without_tokenizer_files(tmp_path, capsys):
    """Imported weights carry no tokenizer: the folder has none, a note says so, and it reads back."""
    cfg = tiny_config("decoder_only", "ngpt", vocab_size=41, pad_id=40, bos_id=None, eos_id=None)
    params = tnt_torch.to_canonical(tnt_torch.TnT(cfg, seed=1))
    from tnt_torch import checkpoint

    checkpoint.save(tmp_path / "run" / "checkpoints", 0, params, {},
                    make_meta("torch", 0, RunConfig(cfg, TrainConfig(seq_len=8)), {"kind": "none"}))
    assert cli.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().err.startswith("note: ") and not (tmp_path / "hf" / "tokenizer.json").exists()
    model, run, tok = tnt_torch.load_checkpoint(tmp_path / "hf")
    assert tok is None and run.model == cfg
    ids = torch.tensor([[0, 1, 2, 39]])
    with torch.no_grad():
        got = auto_model(tmp_path / "hf", cfg).generate(ids, max_new_tokens=4, do_sample=False)
    assert got[0, 4:].tolist() == generate(model, [ids[0].numpy()], 4).tokens[0].tolist()
