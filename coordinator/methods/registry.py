"""The method registry: each method class under its ``name`` (built-in ones as
:mod:`fedlora_edge.coordinator.methods` imports them, plugins' as :mod:`fedlora_edge.coordinator.plugins` loads them)."""

from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def section_of(cls) -> str:
    return getattr(cls, "section", None) or cls.name.replace("-", "_")


def register(cls: type) -> type:
    """Class decorator: add a method under its ``name`` (twice is an error)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"method class {cls.__name__} has no 'name'")
    if not callable(getattr(cls, "plan", None)):
        raise ValueError(f"method '{name}' has no 'plan'")
    if not (callable(getattr(cls, "aggregate", None)) or callable(getattr(cls, "accumulator", None))):
        raise ValueError(f"method '{name}' has neither 'aggregate' nor 'accumulator'")
    if name in _REGISTRY:
        raise ValueError(f"method '{name}' is registered twice")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (a test's throw-away one); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def method_names() -> list[str]:
    """The registered methods (the built-in ones and those plugins have registered so far)."""
    return sorted(_REGISTRY)


def settings_classes() -> dict[str, type]:
    """Config section -> settings dataclass, of every registered method that has settings."""
    out: dict[str, type] = {}
    for cls in _REGISTRY.values():
        settings = getattr(cls, "Settings", None)
        if settings:
            out[section_of(cls)] = settings
    return out
