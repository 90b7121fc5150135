"""Special ids never take a real token's place (docs/design.md, "Special ids"): the collision
check over the tokenizer interface, tokenizer.json special tokens, where an import's bos/eos come
from, and the generation policy for a model without bos or eos."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_config

import tnt_torch
from tnt.checkpoint_meta import make_meta
from tnt.config import ConfigError, RunConfig, TrainConfig, build_run_config
from tnt.generation import TokenizerMismatch, check_tokenizer, prepare
from tnt.run import fit_tokenizer
from tnt.special_ids import SpecialIdCollision, VocabularyFile, check_special_ids, resolve_import_ids
from tnt.tokenizer import ByteTokenizer
from tnt_torch import checkpoint

# GPT-2's first ids and its one special token, in a 10-id vocabulary
GPT2_LIKE = {"model": {"type": "BPE", "vocab": {"!": 0, '"': 1, "#": 2, "a": 3, "b": 4, "c": 5,
                                                "d": 6, "e": 7, "f": 8, "<|endoftext|>": 9}},
             "added_tokens": [{"id": 9, "content": "<|endoftext|>", "special": True}]}


def gpt2_like(tmp_path) -> VocabularyFile:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(GPT2_LIKE))
    return VocabularyFile(path)


def test_a_special_id_that_is_a_real_token_is_refused_naming_id_and_token():
    tok = ByteTokenizer()  # ids 0, 1, 2 are its specials; byte b is id b + 3
    check_special_ids(tiny_config(vocab_size=300), tok)  # 0/1/2: its own specials
    check_special_ids(tiny_config(vocab_size=300, pad_id=259), tok)  # beyond its ids
    with pytest.raises(SpecialIdCollision, match="eos_id=100 is the tokenizer's real token 'a'"):
        check_special_ids(tiny_config(vocab_size=300, eos_id=100), tok)
    with pytest.raises(TokenizerMismatch, match="eos_id=100 is the tokenizer's real token 'a'"):
        check_tokenizer(tok, tiny_config(vocab_size=300, eos_id=100))


def test_loading_a_checkpoint_whose_eos_is_a_real_token_is_refused(tmp_path):
    cfg = tiny_config("decoder_only", vocab_size=300, eos_id=100)
    params = tnt_torch.to_canonical(tnt_torch.TnT(cfg))
    meta = make_meta("torch", 0, RunConfig(cfg, TrainConfig(seq_len=8)), ByteTokenizer().spec)
    checkpoint.save(tmp_path / "checkpoints", 0, params, {}, meta)
    with pytest.raises(SpecialIdCollision, match="eos_id=100 is the tokenizer's real token 'a'"):
        tnt_torch.load_checkpoint(tmp_path)


def test_tokenizer_json_special_tokens_and_where_import_ids_come_from(tmp_path):
    vocab = gpt2_like(tmp_path)
    assert (vocab.vocab_size, vocab.special_ids, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (
        10, [9], 9, 9, None)
    ids, src = resolve_import_ids(10, {}, {}, vocab)
    assert ids == {"pad_id": 10, "bos_id": 9, "eos_id": 9}
    assert src["eos_id"] == "tokenizer file tokenizer.json: '<|endoftext|>'"
    ids, src = resolve_import_ids(10, {"bos_id": None}, {"eos_id": 4}, None)
    assert ids == {"pad_id": 10, "bos_id": None, "eos_id": 4}
    assert (src["bos_id"], src["eos_id"]) == ("given by the caller", "model_args['eos_id']")
    ids, src = resolve_import_ids(50304, {}, {}, None)
    assert ids == {"pad_id": 50304, "bos_id": 50256, "eos_id": 50256}
    assert src["bos_id"].startswith("GPT-2's <|endoftext|>")
    assert resolve_import_ids(10, {}, {}, None)[0] == {"pad_id": 10, "bos_id": None, "eos_id": None}
    with pytest.raises(SpecialIdCollision, match="bos_id=0 is the tokenizer's real token '!'"):
        resolve_import_ids(10, {"bos_id": 0}, {}, vocab)
    with pytest.raises(SpecialIdCollision, match="eos_id=4 is the tokenizer's real token 'b'"):
        resolve_import_ids(10, {}, {"eos_id": 4}, vocab)
    with pytest.raises(ValueError, match=r"eos_id=10 \(given by the caller\) is not an id"):
        resolve_import_ids(10, {"eos_id": np.int64(10)}, {}, None)
    with pytest.raises(ValueError, match="bos_id must be a token id, None or 'auto', got 'eos'"):
        resolve_import_ids(10, {"bos_id": "eos"}, {}, None)
    with pytest.raises(ValueError, match="has 10 ids, more than the checkpoint's vocabulary of 8"):
        resolve_import_ids(8, {}, {}, vocab)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json has no model.vocab"):
        VocabularyFile(tmp_path / "bad.json")


def test_no_bos_no_eos_policy_and_pad_is_not_a_prompt_token():
    cfg = tiny_config("decoder_only", bos_id=None, eos_id=None)
    assert prepare(cfg, [np.array([1, 2])], 3).dec_BxP.tolist() == [[1, 2]]  # 1, 2 are tokens
    with pytest.raises(ValueError, match=r"prompt 1 is empty and the model has no start token "
                                         r"\(bos_id=None\)"):
        prepare(cfg, [np.array([5]), np.array([], np.int32)], 3)
    with pytest.raises(ValueError, match="prompt 0 contains pad_id=0 at position 1"):
        prepare(cfg, [np.array([5, 0])], 3)
    with pytest.raises(ConfigError, match="needs a bos_id"):
        tiny_config("encoder_decoder", bos_id=None)
    with pytest.raises(ConfigError, match="eos_id=0 equals pad_id"):
        tiny_config(eos_id=0)


def test_import_reads_special_ids_from_a_tokenizer_file(tmp_path):
    d = 32
    state = {"transformer.wte.weight": torch.randn(10, d), "lm_head.weight": torch.randn(10, d),
             "rmsnorm_f.weight": torch.ones(d)}
    for n in ("query", "key", "value", "att_c_proj"):
        state[f"transformer.h.0.{n}.weight"] = torch.randn(d, d)
    state.update({"transformer.h.0.c_fc.weight": torch.randn(8 * d, d),
                  "transformer.h.0.mlp_c_proj.weight": torch.randn(d, 4 * d),
                  "transformer.h.0.rmsnorm_att.weight": torch.ones(d),
                  "transformer.h.0.rmsnorm_mlp.weight": torch.ones(d)})
    gpt2_like(tmp_path)
    _, cfg, _ = tnt_torch.import_reference(state, n_heads=4, max_len=16,
                                           tokenizer_file=tmp_path / "tokenizer.json")
    assert (cfg.vocab_size, cfg.pad_id, cfg.bos_id, cfg.eos_id) == (11, 10, 9, 9)
    with pytest.raises(SpecialIdCollision, match="eos_id=2 is the tokenizer's real token '#'"):
        tnt_torch.import_reference(state, n_heads=4, max_len=16, eos_id=2,
                                   tokenizer_file=tmp_path / "tokenizer.json")


def test_training_takes_special_ids_from_the_tokenizer_and_appends_a_missing_pad(tmp_path):
    """A tokenizer without a pad (GPT-2's) gets the appended id, never a fixed 0."""
    m = fit_tokenizer(build_run_config("cpu-tiny"), gpt2_like(tmp_path), False).model
    assert (m.vocab_size, m.pad_id, m.bos_id, m.eos_id) == (11, 10, 9, 9)
    m = fit_tokenizer(build_run_config("cpu-tiny"), ByteTokenizer(), False).model
    assert (m.vocab_size, m.pad_id, m.bos_id, m.eos_id) == (259, 0, 1, 2)


def test_training_and_import_read_one_role_table(tmp_path):
    """A tokenizer.json with `<s>`, `</s>` and `<|endoftext|>`: the model trained with it and a
    checkpoint imported with it take the same bos and eos (the tables once differed in order)."""
    from tokenizers import Tokenizer

    from tnt.tokenizer import BPETokenizer

    data = {**GPT2_LIKE, "added_tokens": [
        {"id": 9, "content": "<|endoftext|>", "special": True},
        {"id": 10, "content": "<s>", "special": True},
        {"id": 11, "content": "</s>", "special": True}]}
    data["model"] = {**GPT2_LIKE["model"], "vocab": {**GPT2_LIKE["model"]["vocab"],
                                                     "<s>": 10, "</s>": 11}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    vocab = VocabularyFile(path)
    hf = Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "added_tokens": [{**a, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False} for a in data["added_tokens"]],
        "model": {"type": "WordLevel", "vocab": data["model"]["vocab"], "unk_token": "a"}}))
    trained = BPETokenizer(hf, kind="hf")
    assert (vocab.bos_id, vocab.eos_id) == (trained.bos_id, trained.eos_id) == (10, 11)
    assert resolve_import_ids(12, {}, {}, vocab)[0] == {"pad_id": 12, "bos_id": 10, "eos_id": 11}
