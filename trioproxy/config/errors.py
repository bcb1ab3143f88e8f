"""The one error a configuration can raise."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot be used.

    ``errors`` holds one line per problem found, each naming its source (file
    and key path, environment variable or flag) and the bad value; ``str()``
    joins them, one per line, as the operator sees them.
    """

    def __init__(self, *errors: str) -> None:
        super().__init__("\n".join(errors))
        self.errors: tuple[str, ...] = errors
