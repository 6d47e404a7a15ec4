"""Device profiles: what a device can carry, in one small YAML file.

Fields (all figures positive):

- ``memory_total_gb`` / ``memory_usable_gb``: physical memory, and what a training process may
  use once the OS and the device's other work have theirs;
- ``compute_gflops``: sustained float32 matmul throughput (what :func:`measure_profile` measures);
- ``uplink_mbps`` / ``downlink_mbps``: link bandwidth in megabits per second;
- ``trainer``: the training backend: ``torch`` (a PyTorch model, AdamW) or ``executorch`` (a
  training program the coordinator builds, run in ExecuTorch's runtime, SGD; see
  :mod:`fedlora_edge.edge_client.et_train`);
- ``trainer_base``: with ``trainer: executorch``, the frozen base's weights in the training
  program: ``fp32`` or ``int8`` (int8 Linear weights, about a quarter of the memory);
- ``runtime`` / ``quant``: the inference runtime the device runs exported models in
  (``onnxruntime`` or ``executorch``) and the quantization it can hold (onnxruntime: ``fp32``,
  ``int8``, ``int4``, weight-only; executorch: ``fp32``, ``8da8w``, ``8da4w``); ``--export`` writes one artifact per
  (runtime, quant) class in the fleet;
- ``threads``: CPU threads a training process may use;
- ``compression``: optional, how this device's adapters go on the wire (``none``, ``fp16``,
  ``int8``, ``int4`` or ``auto``; empty: the run's ``transport.compression``), for a device whose
  link is known to need it;
- ``sources``: for each figure, where it comes from.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

TRAINERS = ("torch", "executorch")
TRAINER_BASES = ("fp32", "int8")
# inference runtime -> (export format, quantizations it can run)
RUNTIMES = {"onnxruntime": ("onnx", ("fp32", "int8", "int4")), "executorch": ("executorch", ("fp32", "8da8w", "8da4w"))}
COMPRESSIONS = ("none", "fp16", "int8", "int4", "auto")  # core/compress.py's codecs, and the planner's choice
_NUMERIC = ("memory_total_gb", "memory_usable_gb", "compute_gflops", "uplink_mbps", "downlink_mbps")


class ProfileError(ValueError):
    """A profile file is missing a field or has a bad value; the message names file and field."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_total_gb: float
    memory_usable_gb: float
    compute_gflops: float
    uplink_mbps: float
    downlink_mbps: float
    trainer: str = "torch"
    trainer_base: str = "fp32"
    runtime: str = "onnxruntime"
    quant: str = "fp32"
    threads: int = 4
    compression: str = ""  # the run's transport.compression unless set (core/compress.py)
    description: str = ""
    sources: dict = field(default_factory=dict)

    def __post_init__(self):
        for f in _NUMERIC:
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ProfileError(f"profile '{self.name}': {f} must be a positive number, got {v!r}")
        if self.memory_usable_gb > self.memory_total_gb:
            raise ProfileError(f"profile '{self.name}': memory_usable_gb ({self.memory_usable_gb}) exceeds "
                               f"memory_total_gb ({self.memory_total_gb})")
        if self.trainer not in TRAINERS:
            raise ProfileError(f"profile '{self.name}': trainer must be one of {', '.join(TRAINERS)}, "
                               f"got '{self.trainer}'")
        if self.trainer_base not in TRAINER_BASES:
            raise ProfileError(f"profile '{self.name}': trainer_base must be one of {', '.join(TRAINER_BASES)}, "
                               f"got '{self.trainer_base}'")
        if self.trainer_base != "fp32" and self.trainer != "executorch":
            raise ProfileError(f"profile '{self.name}': trainer_base {self.trainer_base} needs trainer executorch "
                               "(the torch trainer holds a float32 base)")
        if self.runtime not in RUNTIMES:
            hint = " (the training backend is the field 'trainer')" if self.runtime == "torch" else ""
            raise ProfileError(f"profile '{self.name}': runtime (the inference runtime for exported models) must "
                               f"be one of {', '.join(RUNTIMES)}, got '{self.runtime}'{hint}")
        if self.quant not in RUNTIMES[self.runtime][1]:
            raise ProfileError(f"profile '{self.name}': quant '{self.quant}' is not one {self.runtime} runs; "
                               f"it runs {', '.join(RUNTIMES[self.runtime][1])}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ProfileError(f"profile '{self.name}': threads must be a positive integer")
        if self.compression not in ("", *COMPRESSIONS):
            raise ProfileError(f"profile '{self.name}': compression must be one of {', '.join(COMPRESSIONS)} (or "
                               f"absent: the run's), got {self.compression!r}")

    @classmethod
    def from_dict(cls, obj: object, where: str = "profile") -> DeviceProfile:
        if not isinstance(obj, dict):
            raise ProfileError(f"{where}: expected a mapping of profile fields")
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ProfileError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = [f for f in ("name", *_NUMERIC) if f not in obj]
        if missing:
            raise ProfileError(f"{where}: missing field(s) {missing}")
        for f in ("name", "trainer", "trainer_base", "runtime", "quant", "compression", "description"):
            if f in obj and (not isinstance(obj[f], str) or len(obj[f]) > 2000):
                raise ProfileError(f"{where}: {f} must be a string (at most 2000 characters)")
        if "sources" in obj and not isinstance(obj["sources"], dict):
            raise ProfileError(f"{where}: sources must be a mapping")
        try:
            return cls(**obj)
        except ProfileError as exc:
            raise ProfileError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def export_class(self) -> tuple[str, str]:
        """(export format, quantization) of the artifact this device runs."""
        return RUNTIMES[self.runtime][0], self.quant


def load_profile(path: str | Path) -> DeviceProfile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    try:
        obj = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    return DeviceProfile.from_dict(obj, str(path))


def save_profile(profile: DeviceProfile, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))


def measure_gflops(size: int = 512, seconds: float = 1.0, threads: int | None = None) -> float:
    """Sustained float32 matmul throughput of this process, in GFLOP/s (best of short bursts)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * size ** 3 / dt / 1e9)
    return best


BUSY_SHARE = 0.2  # other processes using more than this share of the CPUs while the matmuls are timed:
# the machine is busy and the throughput measured is low (on an idle machine they use a few per cent)


@dataclass(frozen=True)
class HostLoad:
    """What else ran on the machine while it was measured."""

    others_share: float          # CPU time other processes used meanwhile, as a share of all the CPUs' time
    load_average: float | None   # the 1-minute load average at the end (None where the OS keeps none)
    cpus: int


def cpu_counters() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine so far, this process's CPU seconds so far), psutil's."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


def host_load(before: tuple[float, float], after: tuple[float, float], seconds: float) -> HostLoad:
    """The load of other processes between two :func:`cpu_counters` readings ``seconds`` apart."""
    import psutil

    cpus = psutil.cpu_count() or 1
    others = max(0.0, (after[0] - before[0]) - (after[1] - before[1]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return HostLoad(others / max(seconds * cpus, 1e-9), load, cpus)


def busy_warning(load: HostLoad, threshold: float = BUSY_SHARE) -> str | None:
    """What to say when other processes took more than ``threshold`` of the CPUs (None: idle enough)."""
    if load.others_share <= threshold:
        return None
    avg = f"; load average {load.load_average:.1f} on {load.cpus} CPUs" if load.load_average is not None else ""
    return (f"this machine was busy while it was measured: other processes used {load.others_share:.0%} of its "
            f"CPUs{avg}, so compute_gflops is likely lower than the device can do; measure again on an idle device")


def measure_profile(name: str | None = None, uplink_mbps: float = 100.0, downlink_mbps: float = 100.0,
                    usable_fraction: float = 0.7, warn=None) -> DeviceProfile:
    """Measure this machine: psutil memory, a short matmul benchmark, CPU threads.

    Bandwidth cannot be measured without a peer, so it is taken as given (and says so).  Where other
    processes were busy during the benchmark (:func:`busy_warning`), ``warn(message)`` is called
    (when given) and the profile's ``sources`` say so beside the figure.
    """
    import psutil

    vm = psutil.virtual_memory()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before, t0 = cpu_counters(), time.perf_counter()
    gflops = measure_gflops(threads=threads)
    busy = busy_warning(host_load(before, cpu_counters(), time.perf_counter() - t0))
    if busy and warn is not None:
        warn(busy)
    total = vm.total / 2**30
    usable = min(vm.available / 2**30, total * usable_fraction)
    return DeviceProfile(
        name=name or platform.node() or "this-machine",
        memory_total_gb=round(total, 2), memory_usable_gb=round(usable, 2),
        compute_gflops=round(gflops, 1), uplink_mbps=uplink_mbps, downlink_mbps=downlink_mbps,
        threads=threads,
        description=f"measured by `fedlora profile` on {platform.platform()}",
        sources={
            "memory_total_gb": "psutil.virtual_memory().total",
            "memory_usable_gb": f"min(available, {usable_fraction:.0%} of total) at measurement time",
            "compute_gflops": "best of 1 s of 512x512 float32 matmuls in torch" + (f"; {busy}" if busy else ""),
            "uplink_mbps": "given (not measured: needs a peer)",
            "downlink_mbps": "given (not measured: needs a peer)",
        })
