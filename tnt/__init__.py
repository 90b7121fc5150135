"""TnT's framework-free core (numpy only): config, parameter table, tokenizers, data, schedule.

Neither `tnt_jax` nor `tnt_torch` is imported here; both import this package.
"""

from importlib.metadata import PackageNotFoundError, version

from tnt.config import ConfigError, ModelConfig, RunConfig, TrainConfig, build_run_config
from tnt.params import ParamSpec, check_canonical, param_specs

try:
    __version__ = version("tnt")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["ConfigError", "ModelConfig", "ParamSpec", "RunConfig", "TrainConfig",
           "build_run_config", "check_canonical", "param_specs"]
