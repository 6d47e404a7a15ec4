"""The round a coordinator has open over MQTT (:class:`OpenRound`): what it assigned and what came
back so far.  Under ``schedule.mode: buffered`` it is the version being collected, its assignments
every plan still out (:mod:`.buffered`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedlora_edge.core.secagg import ServerSecAgg

from .engine import Assignment, Returned


@dataclass
class OpenRound:
    """The round in progress: what was assigned, and what came back so far."""

    index: int
    assignments: dict[str, Assignment]
    skipped: list[dict]
    t0: float
    deadline: float
    accepted: dict[str, tuple[str, Returned]] = field(default_factory=dict)  # device -> (update id, returned)
    failed: dict[str, str] = field(default_factory=dict)       # device -> reason it gave
    gone: dict[str, float] = field(default_factory=dict)       # went offline (its Last Will) before answering: when
    rejected: list[dict] = field(default_factory=list)         # updates refused at arrival
    plan_sent: dict[str, float] = field(default_factory=dict)  # device -> when its plan last went out
    accepted_at: dict[str, float] = field(default_factory=dict)  # device -> when its update was accepted
    plan_received: set[str] = field(default_factory=set)       # devices that acknowledged their plan
    plan_warned: set[str] = field(default_factory=set)
    plan_sessions: dict[str, str] = field(default_factory=dict)  # device -> session its plan went to
    resend_due: set[str] = field(default_factory=set)  # reconnected devices whose plan goes again when allowed
    refusal_acks: dict[str, int] = field(default_factory=dict)  # device -> refusals answered this round
    rejected_index: dict[tuple[str, str], dict] = field(default_factory=dict)  # (device, kind) -> its `rejected` entry
    rejected_kinds: dict[str, int] = field(default_factory=dict)  # device -> kinds of rejection recorded

    grace_s: float = 30.0  # how long a device that went offline may take to come back
    # secure aggregation (privacy.secure_aggregation): the coordinator's half of the round's protocol
    # and its stage: keys -> shares -> masked -> unmask -> done (run_secure_round)
    secagg: ServerSecAgg | None = None
    sa_stage: str = "done"
    sa_deadline: float = 0.0

    def live(self) -> list[str]:
        """The round's devices that may still answer: not failed, not offline past the grace."""
        now = time.monotonic()
        return [d for d in self.assignments if d not in self.failed
                and (d not in self.gone or now - self.gone[d] < self.grace_s)]

    def waiting_for(self) -> list[str]:
        """The devices the round still waits for: not answered, and not offline for longer than the grace."""
        return [d for d in self.live() if d not in self.accepted]

    def any_waiting(self) -> bool:
        """``bool(waiting_for())`` without a scan of the round's devices (checked after every message)."""
        unanswered = len(self.assignments) - len(self.accepted) - len(self.failed.keys() - self.accepted.keys())
        if unanswered > len(self.gone):
            return True
        return bool(self.waiting_for())
