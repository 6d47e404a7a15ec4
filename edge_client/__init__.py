"""fedlora-edge edge client: what a device runs.  It never imports ``coordinator``."""

from .quiet import quiet_third_party as _quiet

__version__ = "0.1.0"

_quiet(everywhere=False)  # the Python API as quiet as the commands (FEDLORA_VERBOSE=1 keeps the noise)
