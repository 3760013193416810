"""User-input errors: raised before any heavy work, with a message naming the config field and the fix.

The CLI prints these as one line (no traceback); anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """Bad user configuration or input: the message names the field and the fix."""


class ConfigPathError(ConfigError, FileNotFoundError):
    """A configured path (model, data, config file) that does not exist or lacks what it needs."""
