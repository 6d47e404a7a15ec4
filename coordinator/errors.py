"""The error every layer of the coordinator may raise for a bad setting (kept apart so that the
config loader and the methods, which define their own settings, need not import each other)."""


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""
