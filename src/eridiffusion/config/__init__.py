"""Config schema, YAML loading and command-line overrides."""

from eridiffusion.config.load import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    translated_yaml,
    unsupported_settings,
    validate_config,
)
from eridiffusion.config.schema import JobConfig

__all__ = [
    "ConfigError",
    "JobConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "translated_yaml",
    "unsupported_settings",
    "validate_config",
]
