"""`--config FILE`: a run's `config.json` or a JSON/YAML file of fields as the base that
`--preset`, the flags and `--set` refine."""

import json

import pytest

from experiments.pretrain import main, make_run, parse_args
from tnt.config import ConfigError, read_config_file


def test_a_run_started_from_another_runs_config_has_the_same_config(corpus, tmp_path):
    first = ["--backend", "torch", "--preset", "cpu-tiny", "--data", corpus, "--max-steps", "2",
             "--seq-len", "16", "--set", "eval_batches=1", "--set", "sample_tokens=0",
             "--set", "d_model=32", "--lr", "0.003", "--set", "warmup_steps=1"]
    assert main([*first, "--out", str(tmp_path / "a")]) == 0
    assert main(["--backend", "torch", "--config", str(tmp_path / "a" / "config.json"),
                 "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / r / "config.json").read_text()) for r in "ab")
    assert a == b and a["model"]["d_model"] == 32 and a["train"]["lr"] == 0.003


def cfg_of(*argv):
    return make_run(parse_args(list(argv))).cfg


def test_preset_flags_and_set_refine_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"d_model": 48, "n_heads": 4}, "train": {"max_steps": 7}}))
    cfg = cfg_of("--config", str(path))
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.train.max_steps) == (48, 4, 7)
    cfg = cfg_of("--config", str(path), "--max-steps", "9", "--set", "n_heads=2")
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.train.max_steps) == (48, 2, 9)
    cfg = cfg_of("--config", str(path), "--preset", "cpu-tiny")  # the preset's shape wins
    assert (cfg.model.d_model, cfg.train.max_steps) == (64, 50)


def test_a_flat_yaml_file_with_prefixed_names(tmp_path):
    pytest.importorskip("yaml", reason="YAML configs need PyYAML")
    path = tmp_path / "c.yaml"
    path.write_text("d_model: 48\ntrain.lr: 1e-3\nnorm: rmsnorm\n")
    cfg = cfg_of("--config", str(path))
    assert (cfg.model.d_model, cfg.model.norm, cfg.train.lr) == (48, "rmsnorm", 1e-3)


@pytest.mark.parametrize("text, needle", [
    ('{"model": {"dmodel": 48}}', "did you mean 'd_model'"),
    ("[1, 2]", "must hold a mapping"),
    ("{d_model: 4", "not valid JSON"),
])
def test_bad_files_are_named_in_one_error_line(tmp_path, capsys, text, needle):
    path = tmp_path / "c.json"
    path.write_text(text)
    assert main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read --config .*nope.json"):
        read_config_file(tmp_path / "nope.json")
