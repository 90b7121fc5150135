"""Datasets as training data (tnt/hf_data.py): parquet, jsonl, arrow and `save_to_disk` sources
written here, train and prepare; binary files in a text folder; prepare's bounded streaming."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

# Offline before `datasets` is imported: it reads these once; no test here may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import datasets  # noqa: E402  (the hf extra, which dev includes)

from experiments.evaluate import evaluate  # noqa: E402
from experiments.prepare import main as prepare_main  # noqa: E402
from experiments.prepare import prepare  # noqa: E402
from experiments.pretrain import main as pretrain_main  # noqa: E402
from tnt.data import (  # noqa: E402
    Batches,
    BatchSpec,
    DataError,
    TokenDirWriter,
    encode_documents,
    is_val_file,
    load_corpus,
    read_token_dir,
)
from tnt.tokenizer import EOS_ID, ByteTokenizer  # noqa: E402

TINY = ["--preset", "cpu-tiny", "--max-steps", "2", "--seq-len", "8", "--set", "eval_batches=1",
        "--set", "sample_tokens=1", "--set", "analysis_every=0"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# A PNG's first bytes: the signature, then the IHDR chunk (NUL bytes in its length field).
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def rows(n: int, tag: str = "train") -> dict[str, list]:
    """Rows with a text column, a second text column and an integer one; row 3 has no text."""
    text = [f"def {tag}{i}(x):\n    return x * {i}  # ünï\n" * (3 + i % 4) for i in range(n)]
    text[3] = None
    return {"text": text, "title": [f"title {tag} {i}" for i in range(n)], "id": list(range(n))}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same rows as a parquet, a jsonl and an arrow file, and a save_to_disk folder with its own
    validation and test splits; a folder of parquet files named by split."""
    root = tmp_path_factory.mktemp("datasets")
    train = datasets.Dataset.from_dict(rows(40))
    train.to_parquet(str(root / "rows.parquet"))
    train.to_json(str(root / "rows.jsonl"))
    splits = datasets.DatasetDict({"train": train, "validation": datasets.Dataset.from_dict(rows(12, "val")),
                                   "test": datasets.Dataset.from_dict(rows(5, "test"))})
    splits.save_to_disk(str(root / "saved"))
    shutil.copy(next((root / "saved" / "train").glob("*.arrow")), root / "rows.arrow")
    (root / "pq").mkdir()
    splits["train"].to_parquet(str(root / "pq" / "train-00000.parquet"))
    splits["validation"].to_parquet(str(root / "pq" / "validation-00000.parquet"))
    return root


def docs(stream: np.ndarray) -> list[str]:
    """The documents of a byte token stream (each ends with eos)."""
    tok = ByteTokenizer()
    cuts = np.flatnonzero(np.asarray(stream) == EOS_ID)
    return [tok.decode(part) for part in np.split(np.asarray(stream), cuts + 1)[:-1]]


@pytest.mark.parametrize("name", ["rows.parquet", "rows.jsonl", "rows.arrow"])
def test_a_dataset_file_is_its_text_column_split_by_a_hash_of_the_text(sources, name):
    corpus = load_corpus(str(sources / name))
    texts = [t for t in rows(40)["text"] if t]
    want_val = [t for t in texts if is_val_file(t, 5.0)]
    assert want_val and len(want_val) < len(texts)  # the fixture exercises both sides of the split
    assert docs(corpus.val) == want_val
    assert docs(corpus.train) == [t for t in texts if not is_val_file(t, 5.0)]
    assert corpus.train_bytes == sum(len(t.encode()) for t in texts if not is_val_file(t, 5.0))
    assert not any('"text"' in d or "title" in d for d in docs(corpus.train))  # no keys, no other columns
    assert len(corpus.notes) == 1 and "hash-chosen share" in corpus.notes[0]


@pytest.mark.parametrize("name", ["saved", "pq"])
def test_a_datasets_own_validation_split_is_used(sources, name):
    corpus = load_corpus(str(sources / name))
    assert docs(corpus.train) == [t for t in rows(40)["text"] if t]
    assert docs(corpus.val) == [t for t in rows(12, "val")["text"] if t]
    note = corpus.notes[0]
    assert "split 'train'" in note and "split 'validation'" in note
    assert ("test not read" in note) == (name == "saved")


def test_an_empty_validation_split_is_refused_by_name(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 9}) + "\n"
                                                  for i in range(20)))
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": None}) + "\n")
    corpus = load_corpus(str(tmp_path))
    assert len(docs(corpus.train)) == 20 and len(corpus.val) == 0
    with pytest.raises(DataError, match="the val split has 0 tokens"):
        Batches(BatchSpec("decoder_only", 2, 8, 0, None), corpus.train, corpus.val, 0)


def test_text_field_picks_the_column_and_a_missing_one_is_named(sources):
    corpus = load_corpus(str(sources / "rows.parquet"), text_field="title")
    assert sorted(docs(corpus.train) + docs(corpus.val)) == sorted(rows(40)["title"])
    with pytest.raises(DataError, match=r"no text field 'body'; its columns are text, title, id"):
        load_corpus(str(sources / "rows.jsonl"), text_field="body")
    with pytest.raises(DataError, match=r"field 'id' of row 0 .* holds int, not text"):
        load_corpus(str(sources / "saved"), text_field="id")


@pytest.mark.parametrize("name, extra", [
    ("rows.parquet", []),
    ("rows.jsonl", ["--text-field", "title"]),
    ("saved", []),
])
def test_pretrain_on_a_dataset_saves_its_text_field(sources, tmp_path, capsys, name, extra):
    """torch: these runs test the data, and its tiny steps take no compile time (test_data.py
    trains JAX on a token folder)."""
    out = tmp_path / "run"
    assert pretrain_main(TINY + ["--backend", "torch", "--arch", "decoder_only", "--data",
                                 str(sources / name), "--out", str(out)] + extra) == 0
    assert "note: dataset" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert cfg["text_field"] == ("title" if extra else "text") and cfg["data"] == str(sources / name)
    r = evaluate(out, str(sources / name), batches=1)
    assert np.isfinite(r["loss"]) and r["notes"]
    if extra:  # evaluate reads the run's own text field unless told otherwise
        assert r["stream_bytes"] == sum(len(t.encode()) for t in rows(40)["title"])
        assert evaluate(out, str(sources / name), batches=1, text_field="text")["stream_bytes"] == sum(
            len(t.encode()) for t in rows(40)["text"] if t)
    if name == "saved":  # scored on the dataset's own validation split (or train, on request)
        val = sum(len(t.encode()) for t in rows(12, "val")["text"] if t)
        assert r["stream_bytes"] == val
        assert evaluate(out, str(sources / name), batches=1, split="train")["stream_bytes"] > val


def test_compare_passes_text_field_to_every_run_as_a_setting():
    from experiments.compare import parse_args

    args = parse_args(["--text-field", "title", "--set", "seq_len=8"])
    assert args.set == ["seq_len=8", "text_field=title"]


def test_a_missing_text_field_is_one_error_line(sources, tmp_path, capsys):
    for flags in (["--text-field", "body"], ["--set", "text_field=body"]):
        assert pretrain_main(TINY + ["--data", str(sources / "rows.parquet"), "--out", str(tmp_path / "r")]
                             + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "'body'" in err[0] and "title" in err[0]
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert prepare_main(["--data", str(sources / "saved"), "--out", str(tmp_path / "t"),
                         "--text-field", "body"]) == 2
    assert "no text field 'body'" in capsys.readouterr().err
    assert not (tmp_path / "t" / "meta.json").exists() and not list((tmp_path / "t").glob(".*.tmp"))


def test_hf_sources_offline_are_one_error_line(tmp_path, capsys):
    """In a fresh process: `datasets` reads the offline variables when it is imported."""
    p = subprocess.run([sys.executable, "-m", "experiments.prepare", "--data", "hf:someone/corpus:en",
                        "--out", str(tmp_path / "t")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **OFFLINE})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: cannot fetch hf:someone/corpus:en: the machine is offline")
    assert not (tmp_path / "t" / "meta.json").exists()
    assert prepare_main(["--data", "hf:no-owner", "--out", str(tmp_path / "t")]) == 2
    assert "is not of the form hf:OWNER/NAME[:CONFIG]" in capsys.readouterr().err


def test_an_unreachable_hub_and_a_missing_datasets_library_are_named(monkeypatch):
    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    for k in OFFLINE:
        monkeypatch.delenv(k)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="cannot fetch hf:a/b: the Hub cannot be reached"):
        load_corpus("hf:a/b")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(DataError, match=r"needs the `datasets` library: pip install 'tnt\[hf\]'"):
        load_corpus("hf:a/b")


def test_a_file_that_does_not_parse_is_one_error_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not a parquet file")
    for name in ("bad.jsonl", "bad.parquet"):
        assert pretrain_main(TINY + ["--data", str(tmp_path / name), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: datasets cannot read '{tmp_path / name}'")


def test_a_folder_mixing_dataset_and_text_files_is_refused(sources, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(DataError, match=r"mixes dataset files \(.jsonl\) with other files \(b.txt\)"):
        load_corpus(str(tmp_path))


def test_a_text_folder_skips_binary_files_in_one_note(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"doc{i}.txt").write_text(f"text number {i} é\n" * 10)
    (src / "image.png").write_bytes(PNG + bytes(range(256)))
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))  # not UTF-8
    corpus = load_corpus(str(src))
    text = docs(corpus.train) + docs(corpus.val)
    assert sorted(text) == sorted(f"text number {i} é\n" * 10 for i in range(6))
    assert not any("\ufffd" in d for d in text)
    assert corpus.notes == [f"note: skipped 2 binary file(s) in {src} (NUL bytes or not UTF-8): "
                            f"image.png, latin1.txt"]
    assert prepare_main(["--data", str(src), "--out", str(tmp_path / "tok"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: skipped 2 binary file(s)") == 1
    assert np.array_equal(read_token_dir(tmp_path / "tok").train, corpus.train)


@pytest.mark.parametrize("kind, workers", [("byte", 1), ("bpe", 2)])
def test_streaming_prepare_of_a_dataset_larger_than_its_buffer_gives_the_in_memory_tokens(
        sources, tmp_path, monkeypatch, kind, workers):
    buffer = 200
    texts = [t for t in rows(40)["text"] if t]
    assert sum(map(len, texts)) > 20 * buffer
    appended = []
    append = TokenDirWriter.append
    monkeypatch.setattr(TokenDirWriter, "append",
                        lambda self, split, ids, n: appended.append(n) or append(self, split, ids, n))
    streamed = prepare(str(sources / "rows.jsonl"), str(tmp_path / "tok"), kind, bpe_vocab_size=300,
                       workers=workers, buffer_chars=buffer)
    # bounded: each write is at most the buffer plus the one document that filled it (in bytes)
    assert len(appended) > 10 and max(appended) <= 2 * (buffer + max(len(t.encode()) for t in texts))
    in_memory = load_corpus(str(sources / "rows.jsonl"), kind, bpe_vocab_size=300)
    assert streamed.tokenizer.spec == in_memory.tokenizer.spec
    for split in ("train", "val"):
        assert np.array_equal(getattr(streamed, split), getattr(in_memory, split))
        assert getattr(streamed, f"{split}_bytes") == getattr(in_memory, f"{split}_bytes")
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    if kind == "bpe":  # the tokenizer is a file beside meta.json, not a string inside it
        assert meta["tokenizer"] == {"kind": "bpe", "vocab_size": streamed.tokenizer.vocab_size,
                                     "file": "tokenizer.json"}
        assert (tmp_path / "tok" / "tokenizer.json").read_text() == in_memory.tokenizer.spec["json"]
    else:
        assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 259}
        assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_token_folders_with_the_tokenizer_inside_meta_still_read(tmp_path):
    from tnt.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["some text to learn from " * 20], 270)
    ids = encode_documents(tok, ["some text", "to learn"])
    (tmp_path / "train.bin").write_bytes(ids.astype("<u2").tobytes())
    (tmp_path / "val.bin").write_bytes(ids.astype("<u2").tobytes())
    meta = {"format": "tnt-tokens-v1", "dtype": "uint16", "source": "x", "tokenizer": tok.spec,
            "train_tokens": int(ids.size), "val_tokens": int(ids.size)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    corpus = read_token_dir(tmp_path)
    assert corpus.tokenizer.spec == tok.spec and np.array_equal(corpus.train, ids)
    meta["tokenizer"] = {"kind": "bpe", "vocab_size": tok.vocab_size, "file": "tokenizer.json"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="cannot read its tokenizer file.*tokenizer.json"):
        read_token_dir(tmp_path)
