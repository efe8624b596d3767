"""Run configuration: typed schema, YAML + dotted overrides, up-front validation."""

from megatron_cegppo.config.errors import ConfigError
from megatron_cegppo.config.loader import load_config, parse_override, to_dict
from megatron_cegppo.config.schema import Config
from megatron_cegppo.config.validate import problems, validate

__all__ = ["Config", "ConfigError", "load_config", "parse_override", "problems", "to_dict", "validate"]
