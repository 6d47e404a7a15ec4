"""The export's errors, apart from the modules that raise them (no module imports another just for them)."""

from __future__ import annotations


class ExportError(ValueError):
    """Bad input to an export: an unknown format or quantization, an adapter folder that is not one."""


class ArtifactError(ExportError):
    """An artifact that is missing, of an unknown kind, or that its runtime cannot load."""
