"""Fleets: the devices of an emulated deployment, each with a profile.

A fleet file lists devices, each ``{id, profile}`` where ``profile`` names a file in
``profiles/`` (``raspberry-pi-4``) or is a path; ``count: N`` expands an entry into N devices
``id-1..id-N``.  A fleet is named by path or by its name under ``profiles/fleets/``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedlora_edge.core.profile import DeviceProfile, ProfileError, load_profile


def _profiles_dir() -> Path:
    """The built-in profiles: the installed package ``fedlora_edge.profiles`` (the repository's
    ``profiles/``), or that folder beside this package in a checkout that is not installed."""
    spec = importlib.util.find_spec("fedlora_edge.profiles")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "profiles"


PROFILES_DIR = _profiles_dir()


@dataclass(frozen=True)
class Device:
    id: str
    profile: DeviceProfile


def _find(name: str, folder: Path, what: str) -> Path:
    for cand in (Path(name), folder / name, folder / f"{name}.yaml"):
        if cand.is_file():
            return cand
    avail = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ProfileError(f"{what} '{name}' not found (looked for {name} and {folder}/{name}.yaml); "
                       f"available: {', '.join(avail)}")


def find_profile(name: str) -> DeviceProfile:
    return load_profile(_find(name, PROFILES_DIR, "profile"))


def load_fleet(name: str) -> list[Device]:
    path = _find(name, PROFILES_DIR / "fleets", "fleet")
    try:
        obj = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    entries = obj.get("devices") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ProfileError(f"{path}: expected a non-empty 'devices' list")
    devices: list[Device] = []
    for i, e in enumerate(entries):
        where = f"{path}: devices[{i}]"
        if not isinstance(e, dict) or "id" not in e or "profile" not in e:
            raise ProfileError(f"{where}: each device needs 'id' and 'profile'")
        prof = find_profile(str(e["profile"]))
        count = e.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise ProfileError(f"{where}: count must be a positive integer")
        ids = [str(e["id"])] if count == 1 else [f"{e['id']}-{k + 1}" for k in range(count)]
        devices.extend(Device(d, prof) for d in ids)
    seen = set()
    for d in devices:
        if d.id in seen:
            raise ProfileError(f"{path}: device id '{d.id}' appears twice")
        seen.add(d.id)
    return devices
