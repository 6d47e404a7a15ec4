"""What a run's outputs read of it: :class:`RunSummary`, built by the engine
(:meth:`~fedlora_edge.coordinator.engine.Engine.run_summary`) and handed to :mod:`.report`'s
functions (the report dict, the output files, a round's checkpoint) and, through them, to the
model cards (:mod:`.modelcard`).  The report never sees the engine itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fedlora_edge.core.data import Example
    from fedlora_edge.core.models import ModelSource

    from .config import RunConfig
    from .fleet import Device
    from .methods import MethodContext
    from .methods.base import Bound
    from .planner import Capacity
    from .runstate import RunState


class Member(Protocol):
    """A device of the run as the report sees it (the engine's ``ClientData`` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def mix(self) -> Mapping[str, float]: ...

    @property
    def examples(self) -> int: ...

    @property
    def fleet_device(self) -> Device: ...

    @property
    def planned(self) -> Capacity: ...


@dataclass(frozen=True)
class RunSummary:
    """The run as its report, output files and checkpoints read it, at the moment it is built.

    The names are the engine's (a model card reads ``cfg``, ``source``, ``state``, ``clients``,
    ``R``, ``targets`` and ``eval_examples``).  ``state`` is the run's own :class:`RunState` (its
    rounds, global adapter and method state), not a copy; the sequences are snapshots."""

    cfg: RunConfig
    out: Path  # the run's output folder
    source: ModelSource  # the base model, resolved
    device: str  # the torch device the coordinator ran on
    method: Bound  # its ``global_model``, ``summary`` and ``personal_model``
    ctx: MethodContext
    R: int  # the global rank
    targets: tuple[str, ...]  # the adapted module names
    system_prompt: str | None  # the run's prompt format, recorded beside its adapters
    lead: str  # the leading metric and why (:func:`.evaluate.lead_metric`)
    lead_reason: str
    data_notes: tuple[str, ...]
    clients: tuple[Member, ...]  # every device of the fleet (and those that joined)
    pooled: bool  # the method pools every client's data (the centralized reference)
    participants: frozenset[str]  # the devices the method can plan (every round samples among them)
    contaminated: frozenset[str]  # the devices given made-up contamination
    eval_examples: tuple[Example, ...]  # the held-out set
    state: RunState
    base_accuracy: dict | None  # the base model's held-out figures (None before they are measured)
    t_start: float  # ``time.perf_counter()`` when the run started (the report's wall_seconds)
    privacy: dict | None = None  # device-level DP: the guarantee, its parameters and the epsilon spent
