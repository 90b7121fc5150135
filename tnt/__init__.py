"""TnT's framework-free core (numpy only): config, parameter table, tokenizers, data, schedule.

Neither `tnt_jax` nor `tnt_torch` is imported here; both import this package.
"""

from tnt.config import ConfigError, ModelConfig, RunConfig, TrainConfig, build_run_config
from tnt.params import ParamSpec, check_canonical, param_specs

__all__ = ["ConfigError", "ModelConfig", "ParamSpec", "RunConfig", "TrainConfig",
           "build_run_config", "check_canonical", "param_specs"]
