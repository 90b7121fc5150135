import numpy as np
import pytest

from tnt.data import (
    Batches,
    BatchSpec,
    DataError,
    check_token_ids,
    has_pad,
    is_val_file,
    load_corpus,
    read_token_dir,
    split_documents,
    text_files,
    write_token_dir,
)
from tnt.tokenizer import BOS_ID, EOS_ID, BPETokenizer, ByteTokenizer, tokenizer_from_spec


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\n")
    assert ids.min() >= 3 and tok.vocab_size == 259
    assert tok.decode(list(ids) + [tok.eos_id, tok.pad_id]) == "héllo\n"


def test_stdlib_split_is_deterministic_disjoint_and_by_file():
    names = [n for n, _ in text_files("stdlib")]
    assert names == sorted(names) and len(names) > 100
    val = [n for n in names if is_val_file(n, 5.0)]
    assert 0.02 < len(val) / len(names) < 0.09
    assert is_val_file(val[0], 5.0) and not is_val_file(val[0], 0.0)


def test_text_folder_corpus(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 5)
    (tmp_path / ".hidden").write_text("secret")
    corpus = load_corpus(str(tmp_path))
    assert corpus.train.dtype == np.uint16
    total = sum(len(f"document number {i}\n" * 5) + 1 for i in range(30))
    assert len(corpus.train) + len(corpus.val) == total
    assert int((corpus.train == EOS_ID).sum() + (corpus.val == EOS_ID).sum()) == 30


def test_single_file_is_split_by_position(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 100)
    train, val = split_documents(str(f), 10.0)
    assert len(train[0]) == 900 and len(val[0]) == 100


@pytest.mark.parametrize("make, needle", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "contains no files"),
    (lambda p: (p / "blank.txt").write_text("") and None or str(p / "blank.txt"), "is empty"),
])
def test_bad_data_paths_are_named(tmp_path, make, needle):
    with pytest.raises(DataError, match=needle):
        load_corpus(make(tmp_path))


def test_corpus_smaller_than_one_window(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("x" * 50)
    corpus = load_corpus(str(f))
    spec = BatchSpec("decoder_only", 2, 64, 0, BOS_ID)
    with pytest.raises(DataError, match="fewer than one batch window of 65 tokens"):
        Batches(spec, corpus.train, corpus.val, seed=0)


def test_batches_follow_the_objectives_and_are_reproducible():
    stream = np.arange(3, 1003, dtype=np.uint16)
    ed = Batches(BatchSpec("encoder_decoder", 4, 8, 6, BOS_ID), stream, stream, seed=1)
    b = ed.train_batch(5)
    assert b["enc_tokens"].shape == (4, 6) and b["dec_tokens"].shape == (4, 8)
    assert (b["dec_tokens"][:, 0] == BOS_ID).all()
    assert (b["dec_tokens"][:, 1:] == b["labels"][:, :-1]).all()
    assert (b["labels"][:, 0] == b["enc_tokens"][:, -1] + 1).all()  # target follows the prefix
    again = Batches(BatchSpec("encoder_decoder", 4, 8, 6, BOS_ID), stream, stream, seed=1)
    assert all((again.train_batch(5)[k] == v).all() for k, v in b.items())
    assert not (ed.train_batch(6)["labels"] == b["labels"]).all()
    do = Batches(BatchSpec("decoder_only", 4, 8, 0, BOS_ID), stream, stream, seed=1)
    d = do.train_batch(0)
    assert (d["labels"] == d["dec_tokens"] + 1).all() and "enc_tokens" not in d
    first = [e["labels"] for e in do.eval_batches(3)]
    second = [e["labels"] for e in do.eval_batches(3)]
    assert len(first) == 3 and all((x == y).all() for x, y in zip(first, second, strict=True))


def test_prepared_token_folder_is_memory_mapped(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("some text to tokenize " * 200)
    corpus = load_corpus(str(f))
    out = write_token_dir(corpus, tmp_path / "tokens")
    loaded = read_token_dir(out)
    assert isinstance(loaded.train, np.memmap)
    assert (np.asarray(loaded.train) == corpus.train).all() and (loaded.val == corpus.val).all()
    assert load_corpus(str(out)).tokenizer.spec == corpus.tokenizer.spec
    (out / "val.bin").write_bytes(b"\x01")
    with pytest.raises(DataError, match="val.bin holds 0 tokens"):
        read_token_dir(out)


def test_bpe_is_trained_locally_and_rebuilt_from_its_spec(tmp_path):
    texts = ["def foo(x):\n    return x + 1\n"] * 50 + ["class Bar:\n    pass\n"] * 50
    tok = BPETokenizer.train(texts, 300)
    ids = tok.encode(texts[0])
    assert tok.vocab_size <= 300 and len(ids) < len(texts[0]) and ids.min() >= 3
    again = tokenizer_from_spec(tok.spec)
    assert again.decode(ids) == texts[0] == tok.decode(ids)


def test_out_of_range_token_ids_are_reported_with_position():
    check_token_ids(np.array([[0, 5], [39, 1]]), 40)
    with pytest.raises(ValueError, match=r"token id 40 at index \(1, 0\), outside \[0, vocab_size=40\)"):
        check_token_ids(np.array([[0, 5], [40, 1]]), 40, "tokens")
    with pytest.raises(ValueError, match="token id -1"):
        check_token_ids(np.array([-1]), 40)


def test_has_pad_looks_at_the_model_inputs_only():
    real = np.array([[3, 4], [5, 6]])
    assert not has_pad({"dec_tokens": real, "labels": np.array([[4, 0], [6, 0]])}, 0)  # labels: no input
    assert has_pad({"dec_tokens": np.array([[3, 0]]), "labels": real}, 0)
    assert has_pad({"enc_tokens": np.array([[0, 3]]), "dec_tokens": real}, 0)
    assert not has_pad({"enc_tokens": None, "dec_tokens": real}, 0)
    assert has_pad({"dec_tokens": real}, 6)


def test_prepare_then_pretrain_reads_the_token_folder(tmp_path, capsys):
    from experiments.prepare import main as prepare
    from experiments.pretrain import main as pretrain

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"m{i}.py").write_text(f"x{i} = {i}\n" * 40)
    assert prepare(["--data", str(src), "--out", str(tmp_path / "tok"), "--tokenizer", "bpe",
                    "--bpe-vocab-size", "300"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert pretrain(["--preset", "cpu-tiny", "--data", str(tmp_path / "tok"), "--max-steps", "2",
                     "--seq-len", "8", "--out", str(tmp_path / "run"), "--set", "eval_batches=1",
                     "--set", "sample_tokens=2"]) == 0
    from tnt_jax import load_checkpoint

    _, cfg, tok = load_checkpoint(tmp_path / "run")
    assert tok.spec["kind"] == "bpe" and cfg.model.vocab_size == tok.vocab_size <= 300
    assert prepare(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
