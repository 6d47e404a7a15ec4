"""The ``fedlora`` command.  ``fedlora client`` is the device, run from here: it loads nothing of the
coordinator (a device install is the base package alone).  Every other command is the
coordinator's (``coordinator/cli.py``), loaded only when asked for."""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        from .client import main as client_main

        return client_main(argv[1:])
    if argv[:1] == ["--version"]:
        from . import __version__

        print(f"fedlora-edge {__version__}")
        return 0
    try:
        coordinator_cli = importlib.import_module("fedlora_edge.coordinator.cli")
        return coordinator_cli.main(argv)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("rich", "matplotlib", "amqtt"):
            print(f"fedlora: this is a device install ({exc.name} is missing): `fedlora client` runs here; the "
                  "coordinator's commands need `pip install 'fedlora-edge[coordinator]'`", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
