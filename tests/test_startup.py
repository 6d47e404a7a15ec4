"""What a command costs before it does anything: the commands that need no tensors import no torch;
the Python API is as quiet as the commands; `fedlora profile` says when the machine was busy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDLORA_VERBOSE"}
    if verbose:
        env["FEDLORA_VERBOSE"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_commands_that_need_no_tensors_import_no_torch(tmp_path):
    """--help of every command, --version, devices, broker-config and methods, in one fresh process:
    after each, neither torch nor transformers is in sys.modules."""
    reg = str(tmp_path / "reg")
    runs = [["--help"], ["--version"], ["devices", "init", "--registry", reg],
            ["devices", "add", "pi5", "--registry", reg, "--out", str(tmp_path / "pi5.json")],
            ["devices", "list", "--registry", reg],
            ["broker-config", "mosquitto", "--registry", reg, "--out", str(tmp_path / "broker")], ["methods"]]
    code = f"""
import contextlib, io, json, sys
from fedlora_edge.edge_client.cli import main
from fedlora_edge.coordinator.cli import build_parser

commands = [a.choices for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict)][0]
runs = {runs!r} + [[c, "--help"] for c in commands]
seen = []
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code
    seen.append([argv, status, sorted(m for m in ("torch", "transformers") if m in sys.modules)])
print(json.dumps(seen))
"""
    run = _python(code, tmp_path)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert {tuple(argv[:1]) for argv, _, _ in seen} >= {("simulate",), ("compare",), ("emulate",), ("coordinator",),
                                                         ("client",), ("export",), ("generate",), ("profile",)}
    for argv, status, heavy in seen:
        assert status in (0, None) and heavy == [], (argv, status, heavy)


@pytest.mark.integration
def test_the_python_api_is_as_quiet_as_the_commands(tmp_path):
    """A run from Python (docs/python-api.md's way, on tiny-llama) prints none of torchao's, torch's
    or transformers' warnings; FEDLORA_VERBOSE=1 keeps them; a notebook's own warnings still show."""
    code = """
import warnings
from fedlora_edge.coordinator.config import load_config
from fedlora_edge.coordinator.simulate import Simulation

cfg = load_config(overrides={"model": "tiny-llama", "method": "fedit", "rounds": 1, "clients_per_round": 2,
                             "train.steps": 1, "train.batch_size": 2, "data.tasks": ["add"],
                             "data.samples_per_client": 4, "data.eval_per_domain": 2, "max_new_tokens": 2,
                             "lora.rank": 2, "lora.max_rank": 4})
Simulation(cfg, "out").run()
warnings.warn("the notebook's own", FutureWarning)
"""
    quiet = _python(code, tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    for noise in ("Failed to load", "_pytree", "is deprecated", "transformers/"):
        assert noise not in quiet.stderr, quiet.stderr[-3000:]
    assert "the notebook's own" in quiet.stderr
    loud = _python(code.replace('"out"', '"out2"'), tmp_path, verbose=True)
    assert loud.returncode == 0 and "FutureWarning" in loud.stderr.replace("the notebook's own", "")


def test_verbose_takes_back_what_the_quiet_import_did():
    import logging
    import warnings

    from fedlora_edge.core.quiet import _added, quiet_third_party

    with warnings.catch_warnings():
        quiet_third_party(everywhere=False)
        added = list(_added["filters"])
        assert added and all(f in warnings.filters for f in added)
        assert logging.getLogger("torchao").level == logging.ERROR
        quiet_third_party(verbose=True)
        try:
            assert not any(f in warnings.filters for f in added)
            assert not _added["filters"] and logging.getLogger("torchao").level != logging.ERROR
        finally:
            os.environ.pop("FEDLORA_VERBOSE", None)
            quiet_third_party(everywhere=False)  # as `import fedlora_edge.core` left it


def test_the_api_filters_only_the_libraries_warnings():
    import warnings

    from fedlora_edge.core.quiet import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party(everywhere=False)
        warnings.warn_explicit("library noise", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("where a library's deprecation points", FutureWarning, "evaluate.py", 1,
                               module="fedlora_edge.coordinator.evaluate")
        warnings.warn_explicit("mine", FutureWarning, "notebook.py", 1, module="__main__")
    assert [str(w.message) for w in caught] == ["mine"]


def test_profile_says_when_the_machine_was_busy(tmp_path, monkeypatch, capsys):
    from fedlora_edge.coordinator.cli import main
    from fedlora_edge.core import profile

    readings = iter([(100.0, 10.0), (101.9, 11.0)])  # the machine's busy CPU seconds, and this process's
    monkeypatch.setattr(profile, "cpu_counters", lambda: next(readings))
    monkeypatch.setattr(profile, "measure_gflops", lambda **kw: 4.0)

    assert main(["profile", "--out", str(tmp_path / "me.yaml"), "--name", "busy-box"]) == 0

    err = capsys.readouterr().err
    assert "fedlora: warning: this machine was busy while it was measured: other processes used " in err
    assert "measure again on an idle device" in err
    sources = yaml.safe_load((tmp_path / "me.yaml").read_text())["sources"]
    assert "this machine was busy while it was measured" in sources["compute_gflops"]


def test_the_load_of_other_processes_is_their_share_of_the_cpus(monkeypatch):
    import psutil

    from fedlora_edge.core.profile import HostLoad, busy_warning, host_load

    monkeypatch.setattr(psutil, "cpu_count", lambda *a, **k: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 6.0, 5.0))

    load = host_load((100.0, 10.0), (101.9, 11.0), 1.0)  # 1.9 CPU s busy in 1 s, 1.0 of it this process's

    assert load == HostLoad(pytest.approx(0.45), 6.5, 2)
    assert busy_warning(load).startswith("this machine was busy while it was measured: other processes used 45% "
                                         "of its CPUs; load average 6.5 on 2 CPUs, so compute_gflops is likely")
    assert busy_warning(HostLoad(0.05, 0.3, 4)) is None
    assert busy_warning(HostLoad(0.2, None, 4)) is None  # at the threshold: still quiet
    assert "used 21% of its CPUs, so" in busy_warning(HostLoad(0.21, None, 4))
