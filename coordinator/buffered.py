"""Buffered asynchronous rounds (``schedule.mode: buffered``): what ``simulate`` and the MQTT
coordinator share.

A device gets a plan against the model version current when it is idle; every ``buffer`` accepted
updates are folded, in the order they were accepted and in the method's own arithmetic, into a new
version (a "round" of the report and of the run's state).  An update planned ``tau`` versions ago
is moved onto the current version: its change from the start it was planned on, scaled by
``1 / (1 + sqrt(tau))`` (``schedule.staleness_weight: sqrt``, FedBuff's), added to the same plan's
start now; past ``schedule.max_staleness`` it is refused.

``simulate`` runs it on the fleet's profile timings (a virtual clock: :meth:`Simulation.run_buffered`);
the coordinator runs it on real arrivals over MQTT (:class:`BufferedService`), with the round journal
holding each version's accepted updates in the order they were accepted and the plans still out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .aggregate import Contribution
from .engine import Assignment, Returned
from .openround import OpenRound
from .validate import UpdateRejected

if TYPE_CHECKING:
    from fedlora_edge.core.framing import Transfer


def staleness_scale(tau: int, weight: str) -> float:
    """What an update ``tau`` versions old counts of its change: ``1 / (1 + sqrt(tau))`` (sqrt) or 1 (none)."""
    return 1 / (1 + math.sqrt(tau)) if weight == "sqrt" else 1.0


def too_stale(planned: int, version: int, most: int) -> str | None:
    """Why an update planned on ``planned`` cannot join version ``version`` + 1 (None when it can)."""
    tau = version - planned
    if tau > most:
        return f"planned on version {planned}, {tau} version{'s' * (tau != 1)} old: past schedule.max_staleness {most}"
    return None


def moved(contribution: Contribution, planned_start: dict, start_now: dict, scale: float = 1.0) -> Contribution:
    """A stale update moved onto the current version: its change from the start it was planned
    on, times ``scale``, added to the same plan's start now (each in the plan's components).
    ValueError where the two starts do not hold the update's components alike."""
    from fedlora_edge.core.lora import from_state_dict
    from fedlora_edge.edge_client.partial import update_reference

    def factors(start: dict) -> dict:
        ref = update_reference(start, contribution.plan)
        return from_state_dict({k: v for k, v in ref.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))})

    old, now = factors(planned_start), factors(start_now)
    out = {}
    for m, (fa, fb) in contribution.factors.items():
        if not (m in old and m in now and old[m][0].shape == fa.shape == now[m][0].shape
                and old[m][1].shape == fb.shape == now[m][1].shape):
            raise ValueError(f"client {contribution.client}: its stale update of {m} does not fit its plan's start "
                             "now (moved onto the current version it would undo what came since)")
        out[m] = (now[m][0] + scale * (fa - old[m][0]), now[m][1] + scale * (fb - old[m][1]))
    return dataclasses.replace(contribution, factors=out)


def fold_version(engine, version: int, entries: list[tuple[Returned, Contribution, int]], skipped: list[dict],
                 rejected: list[dict], t0: float, failed: Sequence[Returned] = (), annotate=None) -> dict:
    """Fold a version's accepted updates (``(returned, contribution, staleness)``, in the order they
    were accepted) and record it as round ``version``; ``failed``: plans that ended without an
    update in this version (recorded as the round's failures)."""
    fold = engine.start_fold([ret.assignment.client for ret, _, _ in entries])
    for _, contribution, _ in entries:
        fold.offer(contribution.client, contribution)
    returned = [Returned(ret.assignment.released(), None, ret.report, update_len=ret.uplink_bytes, folded=True)
                for ret, _, _ in entries] + list(failed)
    staleness = {ret.assignment.client: tau for ret, _, tau in entries}

    def note(record: dict) -> None:
        for row in record["clients"]:
            row["staleness"] = staleness.get(row["client"])
            row["planned_on_version"] = version - 1 - staleness[row["client"]] if row["client"] in staleness else None
        if annotate is not None:
            annotate(record)

    return engine.close_round(version, returned, skipped, t0, rejected, annotate=note)


def pick(seed: int, version: int, n: int, pool: list[str]) -> str:
    """The ``n``-th device handed a plan in version ``version``, from ``pool`` (sorted): a pure
    function of the run's seed and what is journaled, so a resumed run picks as the first one would."""
    h = hashlib.sha256(f"buffered|{seed}|{version}|{n}".encode()).digest()
    return pool[int.from_bytes(h[:8], "big") % len(pool)]


class BufferedService:
    """The MQTT coordinator's buffered rounds.  The open version is an :class:`OpenRound` whose
    ``index`` is the version being collected and whose ``assignments`` are every plan still out
    (each with its own ``round``: the version it was planned on, plus one); its ``accepted`` are the
    version's buffer, in the order they were accepted.

    Journal (``state/round-NNNNNN`` of the version being collected): the plans out (those carried
    over from earlier versions, written when the version opens, then each new one before it is
    sent), each with the exact start it was planned from; the accepted updates, in order; each plan
    that ended without an update.  A version is folded, the next version's journal written (the
    plans still out carried into it), then the run's state saved: a coordinator killed anywhere
    resumes the version it was in, re-accepting its journaled updates in their order."""

    def __init__(self, co):  # the fedlora_edge.coordinator.service.Coordinator that runs it
        self.co, self.e = co, co.engine
        cfg = self.e.cfg
        self.sc = cfg.schedule
        self.size = min(self.sc.buffer or cfg.clients_per_round, max(1, len(self.e.participants)))
        self.concurrency = self.sc.concurrency or cfg.clients_per_round
        self.starts: dict[str, dict] = {}   # plan out -> the exact start it was planned from
        self.sent_at: dict[str, float] = {}  # plan out -> when it was handed out (its deadline runs from then)
        self.staleness: dict[str, int] = {}  # accepted in this version -> its staleness
        self.handed: dict[str, float] = {}  # accepted in this version -> when its plan was handed out
        self.contributions: dict[str, Contribution] = {}  # accepted in this version, moved onto it
        self.out: set[str] = set()  # not handed a plan again in this version
        self.dispatched = 0  # plans handed out and devices skipped in this version (the journal's count after a resume)
        self.deferred: dict[str, Transfer] = {}  # device -> its complete update that came once the buffer was full

    # ------------------------------------------------------------------------ the open version

    def in_flight(self, r: OpenRound) -> list[str]:
        return [c for c in r.assignments if c not in r.accepted and c not in r.failed]

    def open(self, index: int, carried: dict[str, Assignment], journaled: bool = False) -> OpenRound:
        """Open version ``index`` (collecting its buffer) with the plans still out, journaled first
        (``journaled``: :meth:`publish` wrote it already)."""
        e, co = self.e, self.co
        if not journaled:
            exact = {c: self.starts[c] for c in carried}
            co._store(lambda: e.journal.open(index, e.nonce, list(carried.values()), [], exact=exact))
        before = co.round
        gone = before.gone if before is not None else {}
        r = co.round = OpenRound(index, dict(carried), [], time.perf_counter(), math.inf)
        r.gone = {c: t for c, t in gone.items() if c in carried}  # a carried plan's device still offline
        if before is not None:  # a carried plan its device acknowledged is not sent again after a reconnect
            r.plan_received = {c for c in before.plan_received if c in carried}
            r.plan_sent = {c: t for c, t in before.plan_sent.items() if c in carried}
            r.plan_sessions = {c: s for c, s in before.plan_sessions.items() if c in carried}
        r.grace_s = e.cfg.transport.offline_grace_s
        self.contributions, self.staleness, self.out, self.handed = {}, {}, set(), {}
        self.dispatched = 0
        return r

    def reopen(self, jr) -> OpenRound:
        """The version the coordinator was in when it stopped, from its journal: the plans out and
        the updates accepted, in their order (re-validated and moved as when they came)."""
        from fedlora_edge.core.lora import ClientPlan
        from fedlora_edge.core.wire import decode_tensors

        e, co = self.e, self.co
        assignments = {}
        for c, (meta, start, nbytes) in jr.assignments.items():
            assignments[c] = Assignment(c, int(meta["round"]), ClientPlan.from_json(meta["plan"]), meta, start, nbytes)
            self.starts[c] = dict(decode_tensors(jr.exact[c]))
            self.sent_at[c] = time.monotonic()
        r = co.round = OpenRound(jr.round, assignments, list(jr.skipped), time.perf_counter(), math.inf)
        r.grace_s = e.cfg.transport.offline_grace_s
        # plans handed out in this version and devices it skipped: the count the picks go on from
        self.dispatched = sum(1 for a in assignments.values() if a.round == jr.round) + len(jr.skipped)
        self.out.update(x["client"] for x in jr.skipped)
        for c, (uid, data, report) in jr.updates.items():
            try:
                self.keep(r, c, self.accept(r, assignments[c], data, report))
            except UpdateRejected as exc:
                self.co.log(f"warning: the journal's update of {c} no longer validates ({exc}); it is left out")
                continue
            r.accepted[c] = (uid, Returned(assignments[c], None, report, update_len=len(data), folded=True))
            co.answers.put(c, uid, assignments[c].round, "accepted")
        for c, why in jr.failures.items():
            if c not in r.accepted:
                self._end(r, c, why)
        co.log(f"re-opened version {jr.round}: {len(r.accepted)} of {self.size} update(s) in its buffer, "
               f"{len(self.in_flight(r))} plan(s) out")
        return r

    # ------------------------------------------------------------------------------- updates

    def accept(self, r: OpenRound, a: Assignment, data: bytes, report) -> Contribution:
        """Validate an update against the plan it was made for and move it onto the version being
        collected (UpdateRejected: too stale, or it does not fit)."""
        planned, version = a.round - 1, r.index - 1
        why = too_stale(planned, version, self.sc.max_staleness)
        if why:
            raise UpdateRejected(f"client {a.client}: {why}")
        start = self.starts.get(a.client)
        if start is None:  # (the plan ended: _chunk answers its late update before it gets here)
            raise UpdateRejected(f"client {a.client}: its plan for round {a.round} ended")
        contribution = self.e.accept(a, data, report, start=start)
        if version > planned:
            try:
                contribution = moved(contribution, start, self.e.start_tensors(a.client, a.plan),
                                     staleness_scale(version - planned, self.sc.staleness_weight))
            except ValueError as exc:
                raise UpdateRejected(str(exc)) from None
        return contribution

    def full(self, r: OpenRound) -> bool:
        return len(r.accepted) >= self.size

    def defer(self, client: str, tr: Transfer) -> None:
        """An update that came once the version's buffer was full (in the same batch of messages):
        it is taken, neither journaled nor acknowledged yet, as the next version's first (one per
        device: a copy sent again meanwhile is dropped unanswered, and the device sends it again
        if it must)."""
        self.deferred.setdefault(client, tr)

    def keep(self, r: OpenRound, client: str, contribution: Contribution) -> None:
        """An accepted update joins the buffer (the caller records it in ``r.accepted``)."""
        self.contributions[client] = contribution
        self.staleness[client] = r.index - r.assignments[client].round
        self.starts.pop(client, None)
        self.handed[client] = self.sent_at.pop(client, time.monotonic())

    def refused(self, r: OpenRound, client: str, reason: str) -> None:
        """An update of a plan out was refused: the plan is over (the device dropped it on the
        refusal), and the device gets no other plan in this version."""
        if client in r.assignments and client not in r.accepted and client not in r.failed:
            self.co._store(lambda: self.e.journal.fail(r.index, client, reason))
            self._end(r, client, reason)

    def _end(self, r: OpenRound, client: str, why: str) -> None:
        r.failed[client] = why
        self.out.add(client)
        self.starts.pop(client, None)
        self.sent_at.pop(client, None)

    def sweep(self, r: OpenRound) -> None:
        """Plans the coordinator ended itself (a device's failure event, a revoked device, a program
        it may not get again) end here too (they are journaled where they were ended)."""
        for c in list(r.failed):
            if c in r.assignments and c not in self.out and c not in r.accepted:  # (a plan ended is out)
                self._end(r, c, r.failed[c])

    # ------------------------------------------------------------------------------ the loop

    def dispatch(self, r: OpenRound) -> None:
        """Hand plans to idle devices that are online, up to ``concurrency`` out at once: each one
        journaled (with its exact start) before it is sent."""
        e, co = self.e, self.co
        online = co.online
        while len(self.in_flight(r)) < self.concurrency:
            pool = sorted(c.id for c in e.participants if c.id in online and c.id not in r.assignments
                          and c.id not in self.out)
            if not pool:
                return
            cid = pick(e.cfg.seed, r.index, self.dispatched, pool)
            self.dispatched += 1
            a, skip = e.assign(e.by_id[cid], r.index)
            if a is None:
                self.out.add(cid)
                r.skipped.append(skip)
                co._store(lambda s=skip: e.journal.add(r.index, [], [s]))
                continue
            self.starts[cid] = e.start_tensors(cid, a.plan)
            co._store(lambda x=a: e.journal.add(r.index, [x], exact={x.client: self.starts[x.client]}))
            r.assignments[cid] = a
            self.sent_at[cid] = time.monotonic()
            if cid in co.sessions:
                co.send_plan(a)

    def expire(self, r: OpenRound) -> None:
        """A plan out for longer than ``transport.round_timeout_s``, or whose device went offline
        and was not back within ``transport.offline_grace_s``, ends without an update."""
        tr, now = self.e.cfg.transport, time.monotonic()
        live = set(r.live())
        for c in self.in_flight(r):
            why = None
            if now - self.sent_at.get(c, now) > tr.round_timeout_s:
                why = f"no complete update within transport.round_timeout_s ({tr.round_timeout_s:.0f} s) of its plan"
            elif c not in live:
                why = (f"went offline with its plan out (its Last Will) and was not back within "
                       f"{tr.offline_grace_s:.0f} s")
            if why:
                self.co._store(lambda d=c, w=why: self.e.journal.fail(r.index, d, w))
                self._end(r, c, why)
                self.co.log(f"{c}: its plan of version {r.assignments[c].round} ended: {why}")

    def idle(self, r: OpenRound) -> bool:
        """Nothing out and nobody left to hand a plan to in this version (online or not): the
        version closes with what it has, so a run always ends."""
        if self.in_flight(r):
            return False
        return not [c for c in self.e.participants if c.id not in r.assignments and c.id not in self.out]

    def publish(self, r: OpenRound, exchange_s: float) -> dict[str, Assignment]:
        """Fold the version's buffer, journal the next version with the plans still out, then save
        the run's state (in that order: a crash between the two re-folds this version)."""
        e, co = self.e, self.co
        self.sweep(r)
        order = [c for c in r.accepted if c in self.contributions]
        entries = [(r.accepted[c][1], self.contributions[c], self.staleness[c]) for c in order]
        failed = [Returned(r.assignments[c], failure=why) for c, why in r.failed.items()
                  if c in r.assignments and c not in r.accepted]
        carried = {c: r.assignments[c] for c in self.in_flight(r)}
        if r.index < e.cfg.rounds:
            r_next_starts = {c: self.starts[c] for c in carried}
            co._store(lambda: e.journal.open(r.index + 1, e.nonce, list(carried.values()), [],
                                             exact=r_next_starts))

        def annotate(record: dict) -> None:
            record["protocol_rejections"] = co.refusals.of_round(r.index)
            record["exchange_seconds"] = round(exchange_s, 4)
            record["plans_out"] = len(carried)
            co.annotate(record, r, self.handed)

        record = fold_version(e, r.index, entries, r.skipped, r.rejected, r.t0, failed, annotate)
        for x in record["rejected"]:
            co.log(f"version {r.index}: rejected {x['reason']}")
        co._save_state(r.index)
        co.completed, co.round = r.index, None
        return carried

    def run(self) -> None:
        """The versions left, from the one re-opened (:meth:`reopen`) or the next."""
        co, e = self.co, self.e
        r = co.round if co.round is not None else self.open(co.completed + 1, {})
        while True:
            co._publish_round(r.index, "training")
            e.reporter.round_start(r.index, self.size)
            co.wire_up = {}
            t_send = time.perf_counter()
            deferred, self.deferred = self.deferred, {}
            for c, tr in deferred.items():
                if c in r.assignments and c not in r.accepted and c not in r.failed:
                    co.guarded(c, lambda v=r, d=c, t=tr: co._update(v, d, t))
            co._commit()
            # (a plan carried over is not sent again: its device has it; after a restart each device's
            # hello with a new session gets its plan again, as in synchronous rounds)
            checked, stalled = 0.0, None
            while len(r.accepted) < self.size:
                self.dispatch(r)
                if self.idle(r):
                    break
                # nothing out and nobody online to hand a plan to: wait for one to come back, as long as an
                # offline device's plan would wait for it
                stalled = (stalled or time.monotonic()) if not self.in_flight(r) else None
                if stalled is not None and time.monotonic() - stalled > e.cfg.transport.offline_grace_s:
                    co.log(f"version {r.index}: no device online to hand a plan to for "
                           f"{e.cfg.transport.offline_grace_s:.0f} s; it closes with {len(r.accepted)} update(s)")
                    break
                co._pump(0.2)
                if time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    co._check_plan_acks(r)
                    co._send_due_plans(r)
                    co._leave_revoked(r)
                    self.sweep(r)
                    self.expire(r)
            co._commit()
            carried = self.publish(r, time.perf_counter() - t_send)
            if co.completed >= e.cfg.rounds:
                return
            r = self.open(co.completed + 1, carried, journaled=True)
