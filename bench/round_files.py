"""How many of the product's files a round enters: what a reader must open to follow one round.

    python bench/round_files.py [--repo DIR]

Two counts, on tiny-llama (one round, two devices, two local steps, fedit):

- ``simulate``: the product files (under core/, edge_client/, coordinator/, export/) whose code
  runs while ``Simulation.run_round(1)`` runs, caught with ``sys.setprofile`` in this process;
- ``MQTT``: ``fedlora emulate`` (embedded broker, the coordinator, one OS process per device), every
  process profiled from its start (a ``sitecustomize`` on ``PYTHONPATH`` records the files each
  process enters, in every thread; a module's import or a class body is not counted, only functions run; written every second, so a
  process ended by a signal counts too); the files are the union over the coordinator and the devices,
  minus those the same processes enter with no round at all (``--rounds 0`` is refused, so the
  baseline is ``fedlora --help``, ``fedlora client --help``): what the round adds.

Prints both counts and the files.  ``--repo`` runs another checkout (an earlier commit in a
``git worktree``) with this same script: both counts come from one method.  Names are resolved
from either import layout (``fedlora_edge.coordinator`` or the earlier top-level ``coordinator``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

FOLDERS = ("core", "edge_client", "coordinator", "export")

SITE = textwrap.dedent('''
    import atexit, json, os, sys, threading, time
    _root = os.environ["ROUND_FILES_ROOT"]
    _out = os.path.join(os.environ["ROUND_FILES_OUT"], f"{os.getpid()}.json")
    _seen = set()
    def _prof(frame, event, arg):
        # a function's code run (CO_OPTIMIZED), not a module imported or a class body defined
        if event == "call" and frame.f_code.co_flags & 1:
            f = frame.f_code.co_filename
            if f.startswith(_root):
                _seen.add(f)
    def _dump():
        tmp = _out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(sorted(_seen)))
        os.replace(tmp, _out)
    def _every_second():  # a process ended by a signal still leaves what it entered
        while True:
            time.sleep(1.0)
            _dump()
    sys.setprofile(_prof)
    threading.setprofile(_prof)
    threading.Thread(target=_every_second, daemon=True).start()
    atexit.register(_dump)
''')


def product(files, root: Path) -> set[str]:
    out = set()
    for f in files:
        try:
            rel = Path(f).resolve().relative_to(root)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in FOLDERS and rel.suffix == ".py" and rel.name != "__init__.py":
            out.add(str(rel))
    return out


def _import(name: str, root: Path):
    """``name`` from the checkout at ``root``: under ``fedlora_edge`` there, or top-level in the
    earlier layout (found on ``PYTHONPATH``)."""
    import importlib

    return importlib.import_module(f"fedlora_edge.{name}" if (root / "core").is_dir() else name)


OVERRIDES = {"model": "tiny-llama", "method": "fedit", "rounds": 1, "clients_per_round": 2, "train.steps": 2,
             "train.batch_size": 2, "train.max_seq_len": 32, "data.samples_per_client": 8,
             "data.eval_per_domain": 2, "max_new_tokens": 2, "lora.rank": 2, "lora.max_rank": 4}


def simulate_files(root: Path, out: Path) -> set[str]:
    config = _import("coordinator.config", root)
    simulate = _import("coordinator.simulate", root)
    sim = simulate.Simulation(config.load_config(overrides=dict(OVERRIDES)), out)
    sim.engine.begin()
    seen: set[str] = set()

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_flags & 1:  # functions only (CO_OPTIMIZED)
            seen.add(frame.f_code.co_filename)

    sys.setprofile(prof)
    try:
        sim.run_round(1)
    finally:
        sys.setprofile(None)
    return product(seen, root)


def _profiled(cmd: list[str], root: Path, work: Path, cwd: Path) -> set[str]:
    site, dumps = work / "site", work / f"dumps-{len(list(work.glob('dumps-*')))}"
    site.mkdir(exist_ok=True)
    dumps.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = dict(os.environ, ROUND_FILES_ROOT=str(root), ROUND_FILES_OUT=str(dumps),
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    files: set[str] = set()
    for d in dumps.glob("*.json"):
        files |= product(json.loads(d.read_text()), root)
    return files


def mqtt_files(root: Path, work: Path) -> set[str]:
    cli = "fedlora_edge.edge_client.cli" if (root / "core").is_dir() else "edge_client.cli"  # either layout
    fedlora = [sys.executable, "-m", cli]
    args = [f"--model={OVERRIDES['model']}", "--method=fedit", "--rounds=1", "--clients-per-round=2",
            "--local-steps=2"] + [f"--set={k}={v}" for k, v in OVERRIDES.items()
                                  if k not in ("model", "method", "rounds", "clients_per_round", "train.steps")]
    run = _profiled([*fedlora, "emulate", "--out", str(work / "emulate"), *args], root, work, work)
    idle = _profiled([*fedlora, "--help"], root, work, work) | _profiled([*fedlora, "client", "--help"], root, work, work)
    return run - idle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent),
                   help="the checkout to measure (default: this one)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    root = Path(args.repo).resolve()
    if not args.child:  # the measuring runs in the checkout's own interpreter path
        env = dict(os.environ, PYTHONPATH=str(root))
        raise SystemExit(subprocess.run([sys.executable, __file__, "--repo", str(root), "--child"], env=env,
                                        cwd=root).returncode)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sim = simulate_files(root, work / "sim")
        mqtt = mqtt_files(root, work)
    for label, files in (("simulate", sim), ("MQTT (coordinator + devices)", mqtt)):
        print(f"{label}: {len(files)} files")
        for f in sorted(files):
            print(f"  {f}")


if __name__ == "__main__":
    main()
