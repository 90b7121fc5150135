import dataclasses

import pytest

from tnt.config import ConfigError, ModelConfig, RunConfig, TrainConfig, build_run_config
from tnt.params import param_specs


@pytest.mark.parametrize("kwargs, needle", [
    ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
    ({"d_model": 24, "n_heads": 8}, "must be even"),
    ({"arch": "encoder"}, "unknown arch"),
    ({"norm": "layernorm"}, "unknown norm"),
    ({"activation": "relu"}, "unknown activation"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"pad_id": 500}, "pad_id=500"),
])
def test_invalid_model_config_names_the_problem(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**kwargs)


def test_invalid_train_config_names_the_field():
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="tokenizer"):
        TrainConfig(tokenizer="wordpiece")


def test_seq_len_longer_than_model_maximum_is_refused():
    with pytest.raises(ConfigError, match="seq_len=64 exceeds"):
        RunConfig(ModelConfig(max_len_decoder=32), TrainConfig(seq_len=64))


def test_build_run_config_overrides_and_sets():
    cfg = build_run_config("cpu", {"arch": "decoder_only", "lr": None},
                           ["d_model=64", "model.n_heads=2", "train.lr=0.01", "warmup_steps=none"])
    assert cfg.model.arch == "decoder_only" and cfg.model.d_model == 64
    assert cfg.model.n_heads == 2 and cfg.train.lr == 0.01 and cfg.train.warmup_steps is None
    with pytest.raises(ConfigError, match="unknown config field 'dmodel'"):
        build_run_config("cpu", sets=["dmodel=3"])
    with pytest.raises(ConfigError, match="not a valid int"):
        build_run_config("cpu", sets=["d_model=big"])
    with pytest.raises(ConfigError, match="unknown preset"):
        build_run_config("tpu-huge")


@pytest.mark.parametrize("word,value", [("true", True), ("YES", True), ("1", True),
                                        ("false", False), ("No", False), ("0", False)])
def test_boolean_fields_read_yes_and_no_words(word, value):
    assert build_run_config("cpu", sets=[f"fsdp={word}"]).train.fsdp is value


@pytest.mark.parametrize("word", ["maybe", "", "ture", "2"])
def test_boolean_fields_refuse_other_words(word):
    """`fsdp=maybe` must not read as false and train without FSDP2."""
    with pytest.raises(ConfigError, match=f"fsdp={word!r} is not a valid bool"):
        build_run_config("cpu", sets=[f"fsdp={word}"])


def test_norm_defaults_follow_design():
    ngpt = TrainConfig().resolved("ngpt")
    base = TrainConfig().resolved("rmsnorm")
    assert (ngpt.lr, ngpt.warmup_steps, ngpt.weight_decay) == (15e-4, 0, 0.0)
    assert (base.lr, base.warmup_steps, base.weight_decay) == (6e-4, 100, 0.1)


def test_config_roundtrips_through_dict():
    cfg = build_run_config("cpu-tiny", sets=["norm=rmsnorm"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config field"):
        RunConfig.from_dict({"model": {"bogus": 1}, "train": {}})


@pytest.mark.parametrize("preset", ["ngpt-0.5b", "ngpt-1b"])
def test_paper_presets_have_paper_sizes(preset):
    cfg = build_run_config(preset)
    n = sum(int(__import__("math").prod(s.shape)) for s in param_specs(cfg.model).values())
    expected = {"ngpt-0.5b": 0.5e9, "ngpt-1b": 1.0e9}[preset]
    assert 0.6 * expected < n < 1.6 * expected


def test_param_table_eigen_lrs_and_axes():
    cfg = ModelConfig(d_model=64, n_heads=4)
    specs = param_specs(cfg)
    assert specs["decoder.layers.0.attn.alpha"].eigen_lr == pytest.approx(0.05 * 8)
    assert specs["decoder.layers.0.cross.s_qk"].eigen_lr == pytest.approx(8)
    assert specs["decoder.layers.0.mlp.s_uv"].eigen_lr == 1.0
    assert specs["s_z"].eigen_lr == pytest.approx(8)
    assert specs["encoder.embed"].project_axis == 1
    assert specs["decoder.layers.1.attn.wq"].project_axis == 0
    assert specs["decoder.layers.1.cross.wo"].project_axis == 1
    assert specs["decoder.layers.1.mlp.w_out"].project_axis == 1
    assert specs["lm_head"].project_axis == 0
    assert not any(s.weight_decay for s in specs.values())
    base = param_specs(ModelConfig(norm="rmsnorm"))
    assert all(s.project_axis is None for s in base.values())
    assert {n for n, s in base.items() if s.weight_decay} == {n for n, s in base.items()
                                                              if s.is_matrix}


FLOAT_FIELDS = [(cls, f.name) for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)
                if "float" in str(f.type)]


@pytest.mark.parametrize("cls, name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_refuses_non_finite_values(cls, name, value):
    assert len(FLOAT_FIELDS) >= 10  # rope_base, base_scale, lr, min_lr, betas, eps, grad_clip, ...
    with pytest.raises(ConfigError, match=f"{name} must be a finite number, got {value}"):
        cls(**{name: value})


def test_cpu_preset_rates_per_norm_and_sample_temperature():
    from tnt.config import PRESET_LRS

    for norm in ("ngpt", "rmsnorm"):
        assert build_run_config("cpu", {"norm": norm}).train.lr == PRESET_LRS["cpu"][norm]
        assert build_run_config("cpu", {"norm": norm, "lr": 1e-3}).train.lr == 1e-3  # explicit wins
        assert build_run_config("ngpt-0.5b", {"norm": norm}).train.lr is None  # the paper's rates
        assert build_run_config("cpu", {"norm": norm, "lr": None}).train.lr is None  # a saved config
    with pytest.raises(ConfigError, match="sample_temperature must be >= 0"):
        build_run_config("cpu", sets=["sample_temperature=-1"])


def test_param_table_states_the_structure_its_names_spell():
    for cfg in (ModelConfig(), ModelConfig(norm="rmsnorm"), ModelConfig(arch="decoder_only")):
        for name, s in param_specs(cfg).items():
            layer = () if s.layer is None else ("layers", str(s.layer))
            module = () if s.block is None and s.kind != "norm_scale" else (
                (f"{s.block}_norm" if s.block else "final_norm") if s.kind == "norm_scale"
                else s.block,)
            assert name == ".".join(p for p in (s.stack, *layer, *module, s.attr) if p), name
            assert len(s.axes) == len(s.shape), name
            assert (s.project_axis is None) == (cfg.norm != "ngpt" or not s.is_matrix), name
            if s.project_axis is not None:
                assert s.axes[s.project_axis] == "embed", name
    specs = param_specs(ModelConfig(d_model=64, n_heads=4))
    s = specs["decoder.layers.1.cross.s_qk"]
    assert (s.stack, s.layer, s.block, s.kind, s.axes) == ("decoder", 1, "cross", "s_qk", ("heads",))
    assert specs["lm_head"].axes == ("embed", "vocab") and specs["s_z"].stack is None
    assert specs["encoder.layers.0.mlp.w_out"].axes == ("mlp", "embed")
    assert {s.kind for s in specs.values()} == {"embed", "matrix", "lm_head", "alpha", "s_qk",
                                                "s_uv", "s_z"}


def test_one_name_check_names_missing_and_unexpected():
    from tnt.params import check_names

    cfg = ModelConfig(arch="decoder_only", n_decoder_layers=1)
    names = [n for n in param_specs(cfg) if n != "s_z"] + ["decoder.bogus"]
    with pytest.raises(KeyError, match=r"optimizer state do not match.*missing: s_z; unexpected: "
                                       r"decoder\.bogus"):
        check_names(names, cfg, "optimizer state")
    check_names(list(param_specs(cfg)), cfg)


def test_unknown_field_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'dmodel' \(did you mean 'd_model'\?\)"):
        build_run_config("cpu", sets=["dmodel=256"])
    with pytest.raises(ConfigError, match=r"unknown config field 'zzz'$"):
        build_run_config("cpu", sets=["zzz=1"])
    with pytest.raises(ConfigError, match=r"'n_head' \(did you mean 'n_heads'\?\)"):
        RunConfig.from_dict({"model": {"n_head": 4}, "train": {}})
