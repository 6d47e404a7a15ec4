"""The error every layer of the coordinator may raise for a bad setting (kept apart so that the
config loader and the methods, which define their own settings, need not import each other)."""


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


class StorageError(RuntimeError):
    """The run's state or outputs cannot be written (disk full, read-only): the run stops, having
    acknowledged nothing that is not on disk and left nothing half-written in place; free the
    space and ``--resume`` (exit status 6)."""
