"""Run configuration: the keys (schema), how a Config is built from YAML and overrides (load), and
the checks of a whole Config (checks). Import from here: `from llm_jax.config import load_config`."""

from llm_jax.config.checks import validate, validate_for_devices
from llm_jax.config.load import all_keys, dump_config, load_config, parse_override, to_dict
from llm_jax.config.schema import (
    CHOICES,
    DEFAULT_AXIS_RULES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    DistributedConfig,
    EarlyStoppingConfig,
    FinetuneConfig,
    MeshConfig,
    MixtureSource,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TaskConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "CHOICES", "DEFAULT_AXIS_RULES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistillConfig",
    "DistributedConfig", "EarlyStoppingConfig", "FinetuneConfig", "MeshConfig", "MixtureSource", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "TaskConfig", "TokenizerConfig", "TrainConfig", "all_keys", "dump_config",
    "load_config", "parse_override", "to_dict", "validate", "validate_for_devices",
]
