"""The one error a configuration can raise."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line for the operator."""
