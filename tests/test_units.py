"""tnt.units: bits per byte from text bytes, for byte and BPE tokenizers and token folders."""

import json
import math

import numpy as np
import pytest

from tnt.data import encode_documents, load_corpus, read_token_dir, write_token_dir
from tnt.tokenizer import BPETokenizer, ByteTokenizer
from tnt.units import bits_per_byte, bits_per_token, stream_bytes, text_bytes

TEXTS = ["héllo wörld\n" * 5, "naïve café — ok\n" * 4, "plain ascii line\n" * 6]


def test_bits_per_byte_is_nats_over_ln2_over_bytes_per_token():
    tok = ByteTokenizer()
    stream = encode_documents(tok, TEXTS)
    n_bytes = text_bytes(TEXTS)
    # multi-byte characters: more bytes than characters, and one eos token per document
    assert n_bytes == sum(len(t.encode("utf-8")) for t in TEXTS) > sum(len(t) for t in TEXTS)
    assert len(stream) == n_bytes + len(TEXTS)
    nats = 1.7
    assert bits_per_token(nats) == pytest.approx(nats / math.log(2), rel=1e-15)
    assert bits_per_byte(nats, len(stream), n_bytes) == pytest.approx(
        nats / math.log(2) / (n_bytes / len(stream)), rel=1e-15)
    with pytest.raises(ValueError, match="positive token and byte count"):
        bits_per_byte(nats, 10, 0)


def test_bpe_bytes_come_from_the_text_not_the_tokens():
    tok = BPETokenizer.train(TEXTS * 10, 300)
    stream = encode_documents(tok, TEXTS)
    assert len(stream) < text_bytes(TEXTS)  # BPE tokens carry several bytes each
    assert stream_bytes(tok, stream) == text_bytes(TEXTS)
    assert stream_bytes(tok, stream, chunk=3) == text_bytes(TEXTS)  # chunked at eos
    # the same text costs the same bits per byte whichever tokenizer counted its tokens
    byte_stream = encode_documents(ByteTokenizer(), TEXTS)
    total_bits = 1234.5
    assert bits_per_byte(total_bits * math.log(2) / len(stream), len(stream), text_bytes(TEXTS)) == \
        pytest.approx(bits_per_byte(total_bits * math.log(2) / len(byte_stream), len(byte_stream),
                                    text_bytes(TEXTS)), rel=1e-12)


def test_token_folder_records_bytes_and_older_folders_decode_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(TEXTS * 4):
        (src / f"d{i}.txt").write_text(t)
    corpus = load_corpus(str(src), "byte", 30.0)
    assert corpus.val_bytes == len(corpus.val) - np.sum(corpus.val == corpus.tokenizer.eos_id)
    out = write_token_dir(corpus, tmp_path / "tok")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_bytes"], meta["val_bytes"]) == (corpus.train_bytes, corpus.val_bytes)
    for key in ("train_bytes", "val_bytes"):
        del meta[key]
    (out / "meta.json").write_text(json.dumps(meta))
    old = read_token_dir(out)
    assert old.val_bytes is None and old.split_bytes("val") == corpus.val_bytes
    assert old.split_bytes("train") == corpus.train_bytes
