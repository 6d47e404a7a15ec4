"""Methods from outside the package: ``--plugin`` modules and files, installed entry points, what an
unknown method or an unregistered method's config section says, and docs/methods.md's commands
run as written (examples/halfstep.py, on tiny-llama)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora_edge.coordinator import plugins
from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.methods import get_method, method_names, unregister

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "methods.md"
EXAMPLE = ROOT / "examples" / "halfstep.py"

# a method small enough to write into a test's folder (no settings of its own unless asked)
TINY_METHOD = '''
"""{doc}"""
from dataclasses import dataclass

from fedlora_edge.coordinator.methods import register
from fedlora_edge.core.lora import uniform_plan


@dataclass(frozen=True)
class Settings:
    knob: float = 1.0


@register
class Tiny:
    name = "{name}"
    Settings = Settings

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return uniform_plan(ctx.modules, ctx.rank, ctx.scale)

    def aggregate(self, global_factors, contributions, ctx, state):
        return global_factors, {{}}
'''


@pytest.fixture
def clean_plugins():
    """Whatever a test's plugins register or import is gone after it (the registry is the process's)."""
    names, modules, loaded = set(method_names()), set(sys.modules), list(plugins._loaded)
    yield
    for n in set(method_names()) - names:
        unregister(n)
    for m in set(sys.modules) - modules:
        if m.startswith(("tiny_", "halfstep", "fedlora_test_")):
            del sys.modules[m]
    plugins._loaded[:] = loaded


def _write(folder: Path, file: str, name: str, doc: str = "A tiny test method.") -> Path:
    path = folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TINY_METHOD.format(name=name, doc=doc))
    return path


def test_a_plugin_file_registers_its_method_before_the_config_is_read(tmp_path, clean_plugins):
    path = _write(tmp_path, "tiny_a.py", "tiny-a")
    with pytest.raises(ConfigError, match="method 'tiny-a' is not registered"):
        load_config(overrides={"method": "tiny-a", "tiny_a.knob": 2.0})

    plugins.load_plugin(str(path))
    plugins.load_plugin(str(path))  # twice: nothing more happens
    cfg = load_config(overrides={"method": "tiny-a", "tiny_a.knob": 2.0})

    assert cfg.method_settings["tiny_a"].knob == 2.0 and get_method("tiny-a").name == "tiny-a"
    assert plugins.loaded_plugins() == [str(path.resolve())]


def test_a_plugin_module_is_found_in_the_current_folder(tmp_path, monkeypatch, clean_plugins):
    _write(tmp_path, "tiny_pkg_b/tiny_b.py", "tiny-b")
    (tmp_path / "tiny_pkg_b" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])

    plugins.load_plugin("tiny_pkg_b.tiny_b")

    assert "tiny-b" in method_names()


@pytest.mark.parametrize("make,spec,needle", [
    (None, "nowhere/tiny_x.py", "no such file"),
    (None, "tiny_no_such_module", "no module named 'tiny_no_such_module' in the current folder or on PYTHONPATH"),
    ("x = 1\n", "tiny_empty.py", "registered no method .*@register"),
    ("raise RuntimeError('boom')\n", "tiny_boom.py", r"importing it failed: RuntimeError: boom \(at .*tiny_boom.py:1\)"),
    ("from fedlora_edge.coordinator.methods import register\n\n@register\nclass Twice:\n    name = 'fedit'\n"
     "    def plan(self, *a): ...\n    def aggregate(self, *a): ...\n", "tiny_twice.py", "'fedit' is registered twice"),
])
def test_a_plugin_that_cannot_load_says_which_and_why(tmp_path, monkeypatch, clean_plugins, make, spec, needle):
    monkeypatch.chdir(tmp_path)
    if make is not None:
        (tmp_path / spec).write_text(make)
    with pytest.raises(ConfigError, match=rf"^--plugin {re.escape(spec)}: (.*)?{needle}"):
        plugins.load_plugin(spec)


def test_an_unknown_method_is_named_as_not_registered_with_the_registered_ones_and_how_to_load_one():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"method": "halfstep"})
    msg = str(err.value)
    assert msg.startswith("method: unknown method 'halfstep': it is not registered; valid methods: centralized, ")
    assert "--plugin FILE.py" in msg and "'fedlora_edge.methods' entry point" in msg
    with pytest.raises(ValueError, match="not registered; valid methods: .*fedit"):
        get_method("halfstep")


@pytest.mark.parametrize("overrides,needle", [
    ({"method": "halfstep", "halfstep.server_lr": 0.25},
     r"^halfstep: no registered method has a config section 'halfstep' \(method 'halfstep' is not registered: "
     r"a method from outside the package is loaded with --plugin"),
    ({"hafll.variant": "freeze"}, r"^hafll: no registered method has a config section 'hafll'; .*sections: clair, "),
])
def test_a_section_of_no_registered_method_says_so(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(overrides=overrides)
    assert "unknown field" not in str(err.value)


def _fake_distribution(site: Path, method: str, value: str) -> None:
    """An installed package as importlib.metadata finds it: a dist-info folder with entry points."""
    dist = site / "fedlora_test_methods-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedlora-test-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINTS}]\n{method} = {value}\n")


@pytest.mark.parametrize("value", ["fedlora_test_ep", "fedlora_test_ep:Tiny"])
def test_an_installed_entry_point_loads_when_a_run_names_its_method(tmp_path, monkeypatch, clean_plugins, value):
    site = tmp_path / "site"
    source = TINY_METHOD.format(name="tiny-ep", doc="An installed method.")
    if value.endswith(":Tiny"):  # the entry point names the class, which its module does not register
        source = source.replace("@register\n", "")
    site.mkdir()
    (site / "fedlora_test_ep.py").write_text(source)
    _fake_distribution(site, "tiny-ep", value)
    monkeypatch.syspath_prepend(str(site))
    assert "tiny-ep" not in method_names()

    cfg = load_config(overrides={"method": "tiny-ep", "tiny_ep": {"knob": 3.0}})

    assert cfg.method_settings["tiny_ep"].knob == 3.0 and "tiny-ep" in method_names()
    assert get_method("tiny-ep").name == "tiny-ep"


def test_fedlora_methods_lists_builtins_plugins_and_installed_ones(tmp_path, monkeypatch, capsys, clean_plugins):
    from fedlora_edge.coordinator.cli import main

    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "tiny-installed", "fedlora_test_never_imported")
    monkeypatch.syspath_prepend(str(site))
    path = _write(tmp_path, "tiny_c.py", "tiny-c", doc="Tiny C: a method from a file.")

    assert main(["methods", "--plugin", str(path)]) == 0

    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert set(get_builtin := [n for n, _ in plugins.builtin_catalog()]) <= set(lines) and "fedit" in get_builtin
    assert "Tiny C: a method from a file. (plugin tiny_c)" in lines["tiny-c"]
    assert "installed plugin fedlora_test_never_imported" in lines["tiny-installed"]
    assert "fedlora_test_never_imported" not in sys.modules


def test_the_builtin_catalog_read_from_source_is_what_the_registry_has():
    builtin = dict(plugins.builtin_catalog())
    registry = {}
    for n in method_names():
        impl = type(get_method(n).impl)
        if impl.__module__.startswith("fedlora_edge.coordinator.methods."):
            registry[n] = plugins.summary(sys.modules[impl.__module__].__doc__ or impl.__doc__ or "")
    assert builtin == registry and len(builtin) >= 14


def test_compare_gives_its_run_processes_the_plugins(tmp_path, monkeypatch, clean_plugins):
    from fedlora_edge.coordinator import compare
    from fedlora_edge.coordinator.compare import Run

    path = _write(tmp_path, "tiny_d.py", "tiny-d")
    plugins.load_plugin(str(path))
    seen = {}
    monkeypatch.setattr(compare.subprocess, "Popen", lambda cmd, **kw: seen.setdefault("cmd", cmd))
    cfg = load_config(overrides={"model": "tiny-llama", "method": "tiny-d"})

    compare._start(Run("tiny-d", cfg, tmp_path / "run", "tiny-d"), 1, "none")

    assert seen["cmd"][-2:] == ["--plugin", str(path.resolve())]


def _fedlora() -> list[str]:
    script = Path(sys.executable).with_name("fedlora")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedlora_edge.edge_client.cli"]


@pytest.mark.integration
def test_the_methods_page_commands_run_as_written(tmp_path):
    """docs/methods.md: the example module is examples/halfstep.py, and its commands run from the
    repository's root as written (here on tiny-llama, one short round, in a copy of the root's
    examples/ folder)."""
    text = DOC.read_text()
    code = re.search(r"```python\n# examples/halfstep.py\n(.*?)```", text, flags=re.S).group(1)
    assert code == EXAMPLE.read_text()  # the page shows the file itself
    commands = [c for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                for c in block.strip().splitlines() if c.startswith("fedlora ")]
    assert len(commands) >= 3 and all("--plugin examples/halfstep.py" in c for c in commands)
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "examples" / "halfstep.py")
    (tmp_path / "half.yaml").write_text(re.search(r"```yaml\n(method: halfstep\n.*?)```", text, flags=re.S).group(1))
    tiny = ["--model", "tiny-llama", "--rounds", "1", "--clients-per-round", "2", "--local-steps", "1",
            "--set", "data.tasks=[add]", "--set", "data.samples_per_client=4", "--set", "data.eval_per_domain=2",
            "--set", "max_new_tokens=2", "--set", "lora.rank=2", "--set", "lora.max_rank=4"]

    for command in commands:
        argv = command.split()[1:]
        run = subprocess.run(_fedlora() + argv + (tiny if argv[0] == "simulate" else []), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        if argv[0] == "methods":
            assert re.search(r"^halfstep +FedIT with a server step", run.stdout, flags=re.M)
        else:
            out = tmp_path / argv[argv.index("--out") + 1]
            report = json.loads((out / "report.json").read_text())
            assert report["method"] == "halfstep" and report["rounds"][0]["server_lr"] == 0.25

    bare = subprocess.run(_fedlora() + ["simulate", "--method", "halfstep", "--set", "halfstep.server_lr=0.25",
                                        "--out", "runs/none"], cwd=tmp_path, capture_output=True, text=True)
    assert bare.returncode == 2 and "method 'halfstep' is not registered" in bare.stderr
    assert "--plugin" in bare.stderr and not (tmp_path / "runs" / "none").exists()

