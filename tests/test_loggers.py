"""`--logger tensorboard,wandb`: every chosen logger gets the run's scalars; Weights & Biases in
offline mode writes its run files; bad or unavailable loggers are one `error:` line."""

import sys

import numpy as np
import pytest

from experiments.pretrain import main
from tnt.config import ConfigError
from tnt.loggers import Loggers, parse_loggers


class Recorder:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_histogram(self, tag, values, step):
        self.calls.append(("histogram", tag, len(values), step))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_every_logger_gets_every_call():
    a, b = Recorder(), Recorder()
    both = Loggers([a, b])
    both.add_scalar("train/loss", 1.5, 3)
    both.add_histogram("hist/s_z", np.ones(4), 3)
    both.flush()
    both.close()
    assert a.calls == b.calls == [("scalar", "train/loss", 1.5, 3), ("histogram", "hist/s_z", 4, 3),
                                  ("flush",), ("close",)]


def test_logger_names_are_checked():
    assert parse_loggers("tensorboard, tensorboard") == ("tensorboard",)
    with pytest.raises(ConfigError, match="unknown --logger 'tensorbord' \\(did you mean 'tensorboard'"):
        parse_loggers("tensorbord")
    with pytest.raises(ConfigError, match="names no logger"):
        parse_loggers(",")


def tiny(corpus, out, *extra):
    return main(["--backend", "torch", "--preset", "cpu-tiny", "--data", corpus, "--out", str(out),
                 "--max-steps", "2", "--seq-len", "16", "--set", "eval_batches=1", "--set",
                 "log_every=1", "--set", "sample_tokens=0", *extra])


def test_without_wandb_installed_the_error_names_the_extra(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert tiny(corpus, tmp_path / "run", "--logger", "tensorboard,wandb") == 2
    err = capsys.readouterr().err
    assert err == ("error: --logger wandb needs Weights & Biases, the 'wandb' extra: "
                   "pip install 'tnt[wandb]'\n")
    assert not (tmp_path / "run").exists()


def test_wandb_offline_writes_its_run_files(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the 'wandb' extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert tiny(corpus, tmp_path / "run", "--logger", "tensorboard,wandb") == 0
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    [run] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    [log] = run.glob("run-*.wandb")
    records = log.read_bytes()  # protobuf records: the history rows name their tags
    for tag in (b"train/loss", b"val/loss", b"dyn/alpha/decoder.layers.0.attn", b"d_model"):
        assert tag in records, tag
    assert records.count(b"train/loss") >= 2  # logged at steps 1 and 2
