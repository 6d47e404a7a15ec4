"""fedlora-edge's device: what a device runs (the MQTT client, local training, the ExecuTorch
runtime).  It speaks through :mod:`fedlora_edge.core` and never imports the coordinator."""

from fedlora_edge.core import __version__  # noqa: F401 - the version, and the quiet Python API
