"""The command line: help, plan, profile, and bad input failing before anything starts."""

import ast
import pathlib

import pytest
import yaml

from fedlora_edge.coordinator.cli import main
from fedlora_edge.core.profile import load_profile


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("simulate", "plan", "profile", "methods"):
        assert cmd in out


def test_plan_prints_every_device_and_the_methods_knob(capsys):
    assert main(["plan", "--model", "tiny-llama", "--fleet", "mixed10-with-zero", "--method", "fedit"]) == 0
    out = capsys.readouterr().out
    for dev in ("agx-orin", "phone-1", "pi-zero-1"):
        assert dev in out
    assert "cannot take part" in out  # the 512 MB devices


def test_profile_measures_this_machine_and_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "me.yaml"
    assert main(["profile", "--out", str(out), "--name", "ci-box"]) == 0
    p = load_profile(out)
    assert p.name == "ci-box" and p.compute_gflops > 0 and 0 < p.memory_usable_gb <= p.memory_total_gb
    assert "psutil" in yaml.safe_load(out.read_text())["sources"]["memory_total_gb"]


@pytest.mark.parametrize("argv,needle", [
    (["simulate", "--out", "x", "--model", "nope-model"], "not a built-in"),
    (["simulate", "--out", "x", "--method", "fedprox"], "valid methods"),
    (["simulate", "--out", "x", "--set", "train.lr=-1"], "train.lr"),
    (["simulate", "--out", "x", "--fleet", "nowhere"], "fleet 'nowhere' not found"),
    (["simulate", "--out", "x", "--config", "/no/run.yaml"], "no such file"),
    (["simulate", "--out", "x", "--set", "hafl.variant=melt"], "hafl.variant"),
    (["simulate", "--out", "x", "--method", "fedlease", "--rounds", "2"], "fedlease.warmup_rounds"),
    (["emulate", "--out", "x", "--model", "tiny-llama", "--method", "centralized"], "fedlora simulate --method centralized"),
    (["coordinator", "--out", "x", "--model", "tiny-llama", "--method", "centralized"], "pooled on the server"),
])
def test_bad_input_fails_with_exit_2_and_a_message(tmp_path, capsys, argv, needle):
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("folder, banned", [
    ("edge_client", ("fedlora_edge.coordinator", "fedlora_edge.export")),  # the device runs without them
    ("core", ("fedlora_edge.coordinator", "fedlora_edge.export", "fedlora_edge.edge_client")),  # shared by both
])
def test_the_device_and_the_core_never_import_the_coordinator(folder, banned):
    root = pathlib.Path(__file__).resolve().parent.parent / folder
    for f in root.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                assert not any(n == b or n.startswith(b + ".") for b in banned), f"{f} imports {n}"


def test_fedlora_client_runs_without_loading_the_coordinator():
    # A device install is the base package: `fedlora client` must not need rich, amqtt or the
    # coordinator's modules, so it must not import them.
    import subprocess
    import sys

    code = ("import sys; from fedlora_edge.edge_client.cli import main\n"
            "try: main(['client', '--help'])\n"
            "except SystemExit: pass\n"
            "banned = ('fedlora_edge.coordinator', 'rich', 'amqtt', 'fedlora_edge.export')\n"
            "print('LOADED', sorted({b for b in banned for m in sys.modules if m == b or m.startswith(b + '.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--credentials" in out and "LOADED []" in out


@pytest.mark.integration
def test_an_installed_package_carries_the_built_in_fleets_and_profiles(tmp_path):
    # not an editable checkout: the built-in fleets must come from the installed package data
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(tmp_path / "site"), str(root)], check=True, capture_output=True,
                   cwd=tmp_path)
    code = ("import fedlora_edge.coordinator.fleet as f, sys; print(f.PROFILES_DIR);"
            "from fedlora_edge.edge_client.cli import main; sys.exit(main(['plan', '--fleet', 'mixed8', '--model', 'tiny-llama']))")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(tmp_path / "site")) and "pi4-wifi" in r.stdout
