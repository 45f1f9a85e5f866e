"""A run's configuration: sections (sections.py) with validation, values checked against their
types (values.py), strict YAML (yaml_io.py), the three layers (build.py) and the flags (flags.py)."""

from sft.config.build import FIELDS, build_config, config_class_of, fields_of
from sft.config.flags import StrictArgumentParser, add_config_arguments, config_from_args
from sft.config.sections import (
    CONFIG_CLASSES,
    RUN_CONFIG_FILE,
    DataConfig,
    DPOConfig,
    EvalConfig,
    GRPOConfig,
    LoraSettings,
    ModelConfig,
    SFTConfig,
    TrainingConfig,
)
from sft.config.yaml_io import did_you_mean, saved_run_config
from sft.errors import ConfigError

__all__ = [
    "CONFIG_CLASSES", "FIELDS", "RUN_CONFIG_FILE", "ConfigError", "DPOConfig", "DataConfig", "EvalConfig", "GRPOConfig",
    "LoraSettings", "ModelConfig", "SFTConfig", "StrictArgumentParser", "TrainingConfig", "add_config_arguments",
    "build_config", "config_class_of", "config_from_args", "did_you_mean", "fields_of", "saved_run_config",
]
