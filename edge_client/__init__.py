"""fedlora-edge edge client: what a device runs.  It never imports ``coordinator``."""

__version__ = "0.1.0"
