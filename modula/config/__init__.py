"""The one config: its schema, what a sweep may tune, reading a file (YAML, ``${ENV}``,
``--set``), the name rules, and the options every command shares. The lowest layer: it
imports nothing of modula but :mod:`modula.errors`."""

from modula.config.loader import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    read_raw,
)
from modula.config.schema import (
    DomainConfig,
    ModulaConfig,
    ModulaLayerConfig,
    RouterConfig,
    StageConfig,
    StorageConfig,
    TinyModelConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "DomainConfig",
    "ModulaConfig",
    "ModulaLayerConfig",
    "RouterConfig",
    "StageConfig",
    "StorageConfig",
    "TinyModelConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "read_raw",
]
