"""Configuration: the model (:mod:`.model`) and how it is built.

Sources, lowest to highest precedence: the model's defaults, the TOML file,
``.env``, the environment (``TRIOPROXY_*``), the command line.
"""

from trioproxy.config.errors import ConfigError
from trioproxy.config.model import Config
from trioproxy.config.values import parse_target

__all__ = ["Config", "ConfigError", "parse_target"]
