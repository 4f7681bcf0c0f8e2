"""The training entry point's parts: the config schema (:mod:`.config`) and what differs per model
(:mod:`.recipes`). The loop itself is :mod:`mmgen_pytorch.train`."""

from .allocator import keep_freed_memory
from .config import Config, ConfigError, load_config, parse_config, shipped_configs

__all__ = ["Config", "ConfigError", "keep_freed_memory", "load_config", "parse_config", "shipped_configs"]
