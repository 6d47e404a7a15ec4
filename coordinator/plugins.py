"""Methods from outside the package: ``--plugin`` modules and installed entry points.

A plugin is a Python module that registers one or more methods with
``fedlora_edge.coordinator.methods.register`` when it is imported (docs/methods.md).  Two ways in:

- ``--plugin SPEC`` on every command that takes a method (repeatable): SPEC is the path of a
  ``.py`` file (``examples/halfstep.py``) or a module name importable from the current folder or
  ``PYTHONPATH`` (``my_methods.halfstep``).  It is imported before the config is read, so the
  config may name the method and its settings section.
- An installed package declares an entry point in the group :data:`ENTRY_POINTS`, named after the
  method: ``[project.entry-points."fedlora_edge.methods"] halfstep = "my_methods.halfstep"`` (a
  module, or ``module:Class``, which is registered if the module did not).  It is imported the
  first time a run names a method that is not registered (or a config section of that name).

This module imports neither torch nor the methods: ``fedlora methods`` lists the built-in methods
from their source (:func:`builtin_catalog`), so it starts in a fraction of a second.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .errors import ConfigError

ENTRY_POINTS = "fedlora_edge.methods"
HOW = (f"a method from outside the package is loaded with --plugin FILE.py or --plugin MODULE, or by installing "
       f"a package that declares it as a '{ENTRY_POINTS}' entry point (docs/methods.md)")

_loaded: list[str] = []  # the plugins imported in this process, as specs a child process can load again


def loaded_plugins() -> list[str]:
    """The ``--plugin`` specs imported so far (files as absolute paths), in order: what a process
    started to run part of the job (``compare --jobs``) is given so that it knows the same methods."""
    return list(_loaded)


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback (where a plugin failed)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


def _registered(module: str | None = None) -> set[str]:
    """The registered methods' names (those whose class is defined in ``module`` or below it)."""
    from .methods.registry import _REGISTRY

    return {n for n, cls in _REGISTRY.items()
            if module is None or cls.__module__ == module or cls.__module__.startswith(module + ".")}


def load_plugin(spec: str) -> None:
    """Import the plugin ``spec`` (a ``.py`` file's path or a module name; see the module text).
    Loading one twice is a no-op.  ConfigError naming ``--plugin SPEC`` when it cannot be found,
    fails to import (the error and where) or registers no method."""
    path = Path(spec).expanduser()
    is_file = spec.endswith(".py") or "/" in spec or os.sep in spec
    key = str(path.resolve()) if is_file else spec
    if key in _loaded:
        return
    before = _registered()
    try:
        module = _import_file(spec, path) if is_file else _import_module(spec)
    except ConfigError:
        raise
    except Exception as exc:  # the plugin's own error: say which plugin, what and where
        raise ConfigError(f"--plugin {spec}: importing it failed: {type(exc).__name__}: {exc} "
                          f"(at {_where(exc)})") from exc
    _loaded.append(key)
    if not (_registered() - before or _registered(module)):
        raise ConfigError(f"--plugin {spec}: imported, but it registered no method (decorate the method's class "
                          "with @register, from fedlora_edge.coordinator.methods)")


def _import_file(spec: str, path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"--plugin {spec}: no such file")
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(f"--plugin {spec}: '{name}' is not a Python module name (letters, digits, '_')")
    if name in sys.modules:
        raise ConfigError(f"--plugin {spec}: a module named '{name}' is already imported "
                          f"({getattr(sys.modules[name], '__file__', None) or 'built in'}); rename the file")
    found = importlib.util.spec_from_file_location(name, path)
    if found is None or found.loader is None:
        raise ConfigError(f"--plugin {spec}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # before it runs: dataclasses look their module up by name
    try:
        found.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return name


def _import_module(spec: str) -> str:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` has it; last, so that nothing installed is shadowed
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and (spec == exc.name or spec.startswith(exc.name + ".")):
            raise ConfigError(f"--plugin {spec}: no module named '{exc.name}' in the current folder or on "
                              "PYTHONPATH (a file is given by its path: --plugin my_methods/halfstep.py)") from None
        raise
    return spec


def load_plugins(specs) -> None:
    for spec in specs or ():
        load_plugin(spec)


# ----------------------------------------------------------------------------------- entry points

def installed_plugins() -> list:
    """The installed packages' entry points in :data:`ENTRY_POINTS` (``importlib.metadata``)."""
    from importlib.metadata import entry_points

    return sorted(entry_points(group=ENTRY_POINTS), key=lambda ep: ep.name)


def load_installed(name: str) -> bool:
    """Import the installed plugin whose entry point is named ``name`` (a method name or a config
    section, ``_`` read as ``-``); True when there was one.  An entry point naming a class
    registers it unless its module did.  ConfigError when it fails to import."""
    found = [ep for ep in installed_plugins() if ep.name in (name, name.replace("_", "-"))]
    for ep in found:
        try:
            obj = ep.load()
        except Exception as exc:
            raise ConfigError(f"method '{name}': the installed plugin {ep.value} (entry point '{ep.name}' in "
                              f"{ENTRY_POINTS}) failed to import: {type(exc).__name__}: {exc} "
                              f"(at {_where(exc)})") from exc
        if isinstance(obj, type):
            from .methods.registry import _REGISTRY, register

            obj_name = getattr(obj, "name", None)
            if not isinstance(obj_name, str) or _REGISTRY.get(obj_name) is not obj:
                register(obj)
    return bool(found)


def not_registered(name: str, registered: list[str]) -> str:
    """What an unknown method name is told: which methods there are and how to load another."""
    return f"unknown method '{name}': it is not registered; valid methods: {', '.join(registered)}; {HOW}"


# ------------------------------------------------------------------------------ built-in catalog

def builtin_catalog() -> list[tuple[str, str]]:
    """``(name, summary)`` of every built-in method, read from the source of
    ``coordinator/methods/`` without importing it: the modules ``coordinator/methods/__init__.py``
    imports, each class decorated with ``@register`` there, its ``name``, and the first paragraph of
    its module's docstring (else its class's), whitespace folded, as ``fedlora methods`` shows it."""
    folder = Path(__file__).resolve().parent / "methods"
    init = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
    modules = [a.name for node in init.body if isinstance(node, ast.ImportFrom) and node.level == 1
               and node.module is None for a in node.names]
    out = []
    for mod in modules:
        tree = ast.parse((folder / f"{mod}.py").read_text(encoding="utf-8"))
        for cls in tree.body:
            if not (isinstance(cls, ast.ClassDef)
                    and any(isinstance(d, ast.Name) and d.id == "register" for d in cls.decorator_list)):
                continue
            name = next(s.value.value for s in cls.body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                        and any(isinstance(t, ast.Name) and t.id == "name" for t in s.targets))
            assert isinstance(name, str), f"methods/{mod}.py: {cls.name}.name is not a string"
            out.append((name, summary(ast.get_docstring(tree) or ast.get_docstring(cls) or "")))
    return sorted(out)


def summary(doc: str) -> str:
    """The first paragraph of a docstring, its whitespace folded to single spaces."""
    return " ".join(doc.strip().split("\n\n")[0].split())
