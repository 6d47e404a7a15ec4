"""What the coordinator remembers about refused and answered messages, bounded whatever devices send.

A device (or, on an open broker, anyone) can send messages without end; none of them may make the
coordinator's memory, its log or its report grow without bound.  Two ledgers:

- :class:`Refusals`: refused messages per round, summarised as one entry per (device, kind of
  reason) with a count and the first example, at most ``max_entries`` entries per round (beyond
  that, one overflow entry counts the rest), for the last ``keep_rounds`` rounds.  The kind of a
  reason is its text with numbers and hex ids masked, so "update 3fa2...: transfer of 5242880
  bytes exceeds..." and the same with other numbers count together.  :meth:`Refusals.add` says
  whether a refusal should be logged: the first few of each kind, then every power of ten.
- :class:`Answers`: the answer given to each update id (accepted, rejected, stale), for a re-send
  of the same update to get the same answer; at most ``per_device`` ids per device, oldest
  forgotten first, and a count of re-sends per device.  Update ids have a fixed form (32 hex
  digits, checked before they get here), so an entry's size is bounded too.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque

_MASK = re.compile(r"[0-9a-f]{8,}|\d+(\.\d+)?(e[-+]?\d+)?")
OVERFLOW = "(other devices and reasons)"


def kind_of(reason: str) -> str:
    """``reason`` with its numbers and hex ids masked: refusals of one kind share it."""
    return _MASK.sub("#", reason)[:160]


class Refusals:
    """Refused messages, summarised per round (see the module text)."""

    def __init__(self, max_entries: int = 500, keep_rounds: int = 3, example_chars: int = 300, log_first: int = 3):
        self.max_entries, self.keep_rounds = max_entries, keep_rounds
        self.example_chars, self.log_first = example_chars, log_first
        self._rounds: OrderedDict[int, dict[tuple[str, str], dict]] = OrderedDict()

    def add(self, round_idx: int, device: str, reason: str) -> int:
        """Count one refusal; its count so far when it should be logged (the first few of its kind,
        then the 10th, 100th, 1000th...), else 0."""
        entries = self._rounds.get(round_idx)
        if entries is None:
            entries = self._rounds[round_idx] = {}
            while len(self._rounds) > self.keep_rounds:
                self._rounds.popitem(last=False)
        key = (device[:80], kind_of(reason))
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self.max_entries:
                key = ("*", OVERFLOW)
                entry = entries.get(key)
            if entry is None:
                entry = entries[key] = {"device": key[0], "round": round_idx, "count": 0,
                                        "reason": reason[:self.example_chars] if key[0] != "*" else OVERFLOW}
        entry["count"] += 1
        n = entry["count"]
        return n if n <= self.log_first or (n >= 10 and str(n).rstrip("0") == "1") else 0

    def of_round(self, round_idx: int) -> list[dict]:
        """The round's refusals: per (device, kind of reason) its count and first example."""
        return [dict(e) for e in self._rounds.get(round_idx, {}).values()]

    def total(self, round_idx: int | None = None) -> int:
        rounds = self._rounds.values() if round_idx is None else [self._rounds.get(round_idx, {})]
        return sum(e["count"] for r in rounds for e in r.values())

    def __iter__(self):
        """Every entry kept (the last ``keep_rounds`` rounds), oldest round first."""
        return iter([dict(e) for r in self._rounds.values() for e in r.values()])

    def __len__(self) -> int:
        return sum(len(r) for r in self._rounds.values())

    def __bool__(self) -> bool:
        return len(self) > 0


class Answers:
    """The answer to each update id, per device, for idempotent re-sends (see the module text)."""

    def __init__(self, per_device: int = 16):
        self.per_device = per_device
        self._by_device: dict[str, OrderedDict[str, tuple[int, str, str]]] = {}
        self.resends: dict[str, int] = {}  # device -> re-sends of an update already answered
        self._recent: dict[str, deque] = {}  # device -> the update ids of its last few re-sends

    def get(self, device: str, update_id: str) -> tuple[int, str, str] | None:
        answers = self._by_device.get(device)
        return None if answers is None else answers.get(update_id)

    def put(self, device: str, update_id: str, round_idx: int, status: str, reason: str = "") -> None:
        mine = self._by_device.setdefault(device, OrderedDict())
        mine[update_id] = (round_idx, status, reason[:500])
        mine.move_to_end(update_id)
        while len(mine) > self.per_device:
            mine.popitem(last=False)

    def resent(self, device: str, update_id: str) -> None:
        self.resends[device] = self.resends.get(device, 0) + 1
        self._recent.setdefault(device, deque(maxlen=8)).append(update_id)

    @property
    def recent_resends(self) -> list[tuple[str, str]]:
        """(device, update id) of the last few re-sends of each device."""
        return [(d, u) for d, ids in self._recent.items() for u in ids]

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(*key) is not None

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_device.values())
