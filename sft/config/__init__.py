"""A run's configuration: dataclass sections with validation, YAML presets and CLI flags."""

from sft.config.schema import *  # noqa: F403
from sft.config.schema import (  # noqa: F401
    FIELDS,
    GROUPS,
    RUN_CONFIG_FILE,
    ConfigError,
    SFTConfig,
    StrictArgumentParser,
    _did_you_mean,
    add_config_arguments,
    build_config,
    config_from_args,
    saved_run_config,
)
