"""experiments.evaluate on checkpoints of both backends, a Hugging Face tokenizer.json end to end
(pretrain, prepare, evaluate), and prepare's worker processes."""

import json

import numpy as np
import pytest

from experiments.evaluate import evaluate
from experiments.evaluate import main as evaluate_main
from experiments.prepare import main as prepare_main
from experiments.pretrain import main as pretrain_main
from tnt.data import load_corpus, read_token_dir
from tnt.tokenizer import BPETokenizer, map_special_ids, tokenizer_from_spec

TINY = ["--preset", "cpu-tiny", "--max-steps", "2", "--seq-len", "8", "--set", "eval_batches=1",
        "--set", "sample_tokens=1", "--set", "analysis_every=0"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    src, held = root / "src", root / "held_out.txt"
    src.mkdir()
    for i in range(10):
        (src / f"m{i}.py").write_text(f"def g{i}(y):\n    return y - {i}  # ünïcode\n" * 25)
    held.write_text("class Held:\n    def out(self):\n        return 'never seen'\n" * 20)
    return src, held


@pytest.fixture(scope="module")
def runs(texts, tmp_path_factory):
    """The same tiny model trained by each backend."""
    src, _ = texts
    root = tmp_path_factory.mktemp("runs")
    for backend in ("jax", "torch"):
        assert pretrain_main(TINY + ["--backend", backend, "--data", str(src),
                                     "--out", str(root / backend)]) == 0
    return root


def test_each_backends_checkpoint_scores_the_same_with_either_framework(runs, texts, capsys):
    _, held = texts
    for written in ("jax", "torch"):
        by_jax = evaluate(runs / written, str(held), "jax", batches=2)
        by_torch = evaluate(runs / written, str(held), "torch", batches=2)
        assert by_jax["written_by"] == by_torch["written_by"] == written
        assert by_jax["tokens_scored"] == by_torch["tokens_scored"] > 0
        # fp32 forward passes of the same parameters: agree to a few ulps of the loss
        assert by_jax["loss"] == pytest.approx(by_torch["loss"], rel=1e-5)
        n_bytes = len(held.read_text().encode("utf-8"))
        assert by_jax["stream_bytes"] == n_bytes and by_jax["stream_tokens"] == n_bytes + 1  # + eos
        assert by_jax["bits_per_byte"] == pytest.approx(
            by_jax["loss"] / np.log(2) * (n_bytes + 1) / n_bytes, rel=1e-12)
    assert evaluate_main([str(runs / "jax"), "--data", str(held), "--json", "--batches", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "jax" and np.isfinite(r["loss"])


def test_bad_evaluate_inputs_are_refused(runs, texts, tmp_path, capsys):
    src, held = texts
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "no_ckpt").mkdir()
    (tmp_path / "tiny.txt").write_text("x = 1\n")
    cases = [([str(tmp_path / "no_ckpt"), "--data", str(held)], "holds no committed one"),
             ([str(runs / "jax"), "--data", str(tmp_path / "tiny.txt")],
              "fewer than one window of the checkpoint's 16 tokens (its seq_len 8 + enc_len 8)"),
             ([str(runs / "jax"), "--data", str(held), "--split", "train"],
              "--split train applies to a prepared token folder"),
             ([str(runs / "jax"), "--data", str(tmp_path / "empty")], "has no text"),
             ([str(runs / "jax"), "--data", str(tmp_path / "missing")], "does not exist"),
             ([str(runs / "jax"), "--data", str(held), "--batches", "0"], "--batches must be >= 1")]
    for argv, message in cases:
        assert evaluate_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "--seq-len" not in err, err


def gpt2_like_tokenizer(path, texts):
    """A small byte-level BPE whose only special token is GPT-2's <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def test_hf_tokenizer_json_maps_special_ids_and_grows_the_vocabulary(tmp_path, texts):
    src, _ = texts
    raw = gpt2_like_tokenizer(tmp_path / "tokenizer.json", [p.read_text() for p in src.iterdir()])
    n, eot = raw.get_vocab_size(), raw.token_to_id("<|endoftext|>")
    tok = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (eot, eot)  # GPT-2's one special serves as bos and eos
    assert tok.pad_id == n and tok.vocab_size == n + 1 and tok.added_specials == ["<pad>"]
    assert "added <pad>" in tok.note and f"grown to {n + 1}" in tok.note
    again = tokenizer_from_spec(tok.spec)  # travels as its spec, additions included
    assert (again.pad_id, again.bos_id, again.eos_id, again.vocab_size) == (n, eot, eot, n + 1)
    assert again.note is None and again.spec == tok.spec
    ids = tok.encode("def g1(y):")
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == "def g1(y):"
    from tokenizers import AddedToken, Tokenizer, models

    # "<s>" as ordinary vocabulary (text, not a special token) never becomes bos
    plain = Tokenizer(models.WordLevel({"<s>": 0, "a": 1}, unk_token="a"))
    ids, added = map_special_ids(plain)
    assert ids == {"pad": 2, "bos": 3, "eos": 4} and added == ["<pad>", "<bos>", "<eos>"]
    clash = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    clash.add_special_tokens([AddedToken("</s>", special=True), AddedToken("<pad>", special=True)])
    clash.add_special_tokens([AddedToken("<s>", special=True)])
    ids, added = map_special_ids(clash)
    assert ids == {"pad": 2, "bos": 3, "eos": 1} and added == []


def test_hf_tokenizer_through_pretrain_prepare_and_evaluate(tmp_path, texts, capsys):
    src, held = texts
    path = tmp_path / "tokenizer.json"
    gpt2_like_tokenizer(path, [p.read_text() for p in src.iterdir()])
    assert pretrain_main(TINY + ["--data", str(src), "--tokenizer", str(path),
                                 "--out", str(tmp_path / "run")]) == 0
    assert "added <pad>" in capsys.readouterr().out
    from tnt_jax import load_checkpoint

    _, cfg, tok = load_checkpoint(tmp_path / "run")
    assert tok.spec["kind"] == "hf" and cfg.model.vocab_size == tok.vocab_size
    assert (cfg.model.pad_id, cfg.model.bos_id, cfg.model.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    # prepare with the same file, in 2 worker processes: the same stream as in one process
    assert prepare_main(["--data", str(src), "--out", str(tmp_path / "tok"), "--tokenizer", str(path),
                         "--workers", "2"]) == 0
    prepared, direct = read_token_dir(tmp_path / "tok"), load_corpus(str(src), str(path))
    assert np.array_equal(prepared.train, direct.train) and np.array_equal(prepared.val, direct.val)
    assert prepared.val_bytes == direct.val_bytes and prepared.tokenizer.spec == tok.spec
    r = evaluate(tmp_path / "run", str(tmp_path / "tok"), batches=1)
    assert r["stream_bytes"] == direct.val_bytes and r["stream_tokens"] < r["stream_bytes"]
    assert evaluate_main([str(tmp_path / "run"), "--data", str(held), "--batches", "1",
                          "--tokenizer", str(path)]) == 0  # the same file: accepted
    assert "bits/byte" in capsys.readouterr().out
    assert evaluate_main([str(tmp_path / "run"), "--data", str(held), "--tokenizer", "byte"]) == 2
    assert "is not the one" in capsys.readouterr().err
    # a token folder of another tokenizer is refused by name
    assert prepare_main(["--data", str(src), "--out", str(tmp_path / "bytes")]) == 0
    assert evaluate_main([str(tmp_path / "run"), "--data", str(tmp_path / "bytes")]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert pretrain_main(TINY + ["--data", str(src), "--tokenizer", str(tmp_path / "nope.json"),
                                 "--out", str(tmp_path / "r2")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_prepare_workers_match_one_process_and_show_progress(tmp_path, texts, capsys):
    src, _ = texts
    assert prepare_main(["--data", str(src), "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert prepare_main(["--data", str(src), "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert "train" in capsys.readouterr().err  # the progress bars
    one, two = read_token_dir(tmp_path / "one"), read_token_dir(tmp_path / "two")
    assert np.array_equal(one.train, two.train) and np.array_equal(one.val, two.val)
    assert prepare_main(["--data", str(src), "--out", str(tmp_path / "x"), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
