"""ExecuTorch training programs built beside the coordinator, never in its thread.

Building a training program takes minutes (about 2 on tiny-llama, 11-12 on SmolLM2).  Over MQTT the
coordinator's one thread answers every device, so a build there would leave the whole fleet
unanswered; and what a device says (a hello with a new profile, hence a new rank) must not be able
to start one there.  So:

- the programs the fleet's declared profiles need are built **ahead of round 1**, before the
  coordinator serves anyone (:meth:`Engine.prepare_programs`);
- a program needed later (a device whose measured profile gives it another rank) is built in **a
  process of its own** (:class:`BackgroundBuilds`); until it is ready that device is skipped, with
  the reason in the round's record, and it trains from the first round after;
- a build that fails is reported once and not tried again in the run: the device stays skipped,
  and the record says why.

Only devices whose trainer the operator allowed (the fleet's profiles, ``transport.trainers``) can
be planned on ExecuTorch at all; the coordinator refuses a hello that names another trainer.

``python -m fedlora_edge.coordinator.programs ROOT SPEC_JSON [--cache DIR --identity DIGEST]`` is the child's
entry point: it builds ``SPEC_JSON``'s program into the store at ``ROOT`` (which writes it new and
renames it into place) and exits 0, or prints why not and exits 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class BackgroundBuilds:
    """Program builds in child processes, at most ``parallel`` at a time (see the module text).

    :meth:`ready` is the sidecar when the program can be used now, else None; :meth:`want` starts a
    build if none is running or has failed for it; :meth:`reason` says why a device waits."""

    def __init__(self, store, log=print, parallel: int = 1, command=None):
        self.store, self.log, self.parallel = store, log, parallel
        self._command = command or self._child_command
        self._running: dict[str, tuple[subprocess.Popen, float, Path]] = {}  # key -> (process, started, its log)
        self._queued: dict[str, Mapping] = {}
        self.failed: dict[str, str] = {}  # key -> why its build failed

    def _child_command(self, spec: Mapping) -> list[str]:
        cmd = [sys.executable, "-m", "fedlora_edge.coordinator.programs", str(self.store.root), json.dumps(dict(spec))]
        if self.store.cache is not None and self.store.identity() is not None:
            cmd += ["--cache", str(self.store.cache), "--identity", self.store.identity()]
        return cmd

    def ready(self, spec: Mapping) -> dict | None:
        from fedlora_edge.edge_client.et_train import program_key

        self.poll()
        key = program_key(spec)
        if key in self._running or key in self.failed:
            return None  # a half-written program is never read; a failed one is not tried again
        return self.store.ready(spec)

    def want(self, spec: Mapping) -> None:
        """Build ``spec``'s program in the background unless it is built, building, queued or failed."""
        from fedlora_edge.edge_client.et_train import program_key

        key = program_key(spec)
        if key in self._running or key in self._queued or key in self.failed:
            return
        self._queued[key] = dict(spec)
        self.poll()

    def reason(self, spec: Mapping) -> str:
        from fedlora_edge.edge_client.et_train import program_key

        key = program_key(spec)
        if key in self.failed:
            return f"its executorch training program {key} failed to build: {self.failed[key]}"
        started = self._running.get(key, (None, time.monotonic()))[1]
        return (f"its executorch training program {key} is being built (for {time.monotonic() - started:.0f} s); "
                "it trains from the first round after the build")

    def poll(self) -> None:
        """Reap finished builds (logging the outcome) and start queued ones."""
        for key, (proc, started, log_path) in list(self._running.items()):
            if proc.poll() is None:
                continue
            del self._running[key]
            if proc.returncode == 0:
                self.log(f"training program {key} built in the background ({time.monotonic() - started:.0f} s)")
            else:
                tail = _tail(log_path)
                self.failed[key] = f"exit status {proc.returncode}: {tail}"
                self.log(f"warning: the training program {key} failed to build ({self.failed[key]}); "
                         f"the devices that need it are skipped (its log: {log_path})")
        while self._queued and len(self._running) < self.parallel:
            key, spec = next(iter(self._queued.items()))
            del self._queued[key]
            self.store.root.mkdir(parents=True, exist_ok=True)
            log_path = self.store.root / f"{key}.build.log"
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(self._command(spec), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            self._running[key] = (proc, time.monotonic(), log_path)
            self.log(f"building the training program {key} in the background (log: {log_path})")

    def close(self) -> None:
        """Stop builds still running (the run is over)."""
        for proc, _, _ in self._running.values():
            proc.kill()
            proc.wait()
        self._running.clear()
        self._queued.clear()


def _tail(path: Path, chars: int = 300) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-chars:].replace("\n", " | ") or "(no output)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedlora_edge.coordinator.programs",
                                description="build one ExecuTorch training program into a program store")
    p.add_argument("root", help="the store's folder")
    p.add_argument("spec", help="the program's spec, as JSON")
    p.add_argument("--cache", help="the shared cache of built programs")
    p.add_argument("--identity", help="the digest of the base's weights that keys the cache")
    args = p.parse_args(argv)
    from fedlora_edge.coordinator.et_compile import CompilingStore

    identity = args.identity
    store = CompilingStore(args.root, log=lambda line: print(line, flush=True),  # its stages, to the build's log file
                           cache=args.cache, identity=(lambda: identity) if identity else None)
    try:
        path, side = store.get(json.loads(args.spec))
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator through the exit status and the log
        print(f"{type(exc).__name__}: {exc}", flush=True)
        return 1
    print(f"built {path} ({side['bytes']} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
