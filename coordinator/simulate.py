"""``fedlora simulate``: a whole federated run in one process.

One frozen base model is shared by every client: each assignment is carried out in the same
peft model (the client's adapter installed, trained, read back), through the same code a device
runs (:func:`fedlora_edge.edge_client.work.run_assignment`), and the engine validates and aggregates exactly
what a device would have sent.  Deterministic under ``seed`` on a CPU.

With :meth:`Simulation.use_ray` (``--engine ray``) the clients train in Ray workers
(:mod:`.ray_engine`) and everything else stays here: the same adapter, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora_edge.edge_client.work import run_assignment

from .aggregate import Contribution
from .buffered import fold_version, moved, staleness_scale, too_stale
from .config import RunConfig
from .contamination import ROUND_ATTACKS, UPDATE_ATTACKS, RoundView, attack_update
from .engine import Assignment, Engine, Returned, hash_seed

if TYPE_CHECKING:
    from .ray_engine import RayPool


class Simulation:
    """``Simulation(cfg, out_dir).run()`` -> the report (also written to ``out_dir``)."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, reporter=None):
        self.engine = Engine(cfg, out_dir, reporter)
        # secure aggregation's dropouts, for tests and benches: devices that vanish mid-protocol
        self.drop_before_masking: set[str] = set()
        self.drop_after_masking: set[str] = set()
        # transport.compression int4: each device's error feedback, as the device keeps it (in memory)
        self.feedback: dict[str, dict] = {}
        self.clock = 0.0  # the virtual clock of the profiles' predicted round times (run, run_buffered)
        self.pool: RayPool | None = None  # --engine ray: the training workers (use_ray)
        self.calls: dict[tuple[str, int], Any] = {}  # (client, round) -> its training in a worker

    def use_ray(self, workers: int | None = None, cpus_per_worker: int = 1, address: str | None = None,
                kill_on: set[str] | None = None) -> None:
        """Train the clients in Ray workers (:class:`.ray_engine.RayPool`); ``kill_on``: clients
        whose worker dies as it starts their training (tests)."""
        from .ray_engine import RayPool

        self.pool = RayPool(self.engine, workers, cpus_per_worker, address, kill_on, self.engine.reporter)

    def prefetch(self, assignments) -> None:
        """Hand ``assignments`` to the Ray workers now (a local run trains each in :meth:`carry_out`).
        An executorch device's assignment trains here (its programs are this process's)."""
        if self.pool is None:
            return
        from fedlora_edge.edge_client.work import trainer_of

        for a in assignments:
            if trainer_of(a.meta) == "torch":
                self.calls[(a.client, a.round)] = self.pool.submit(a.client, a.meta, a.start,
                                                                   dict(self.feedback.get(a.client, {})))

    def _trained(self, a: Assignment) -> tuple[bytes, dict] | Returned:
        """``(update, report)`` of ``a``: from its Ray worker where it was prefetched, else trained here."""
        e = self.engine
        call = self.calls.pop((a.client, a.round), None)
        if call is None:
            return run_assignment(e.model, e.tok, e.by_id[a.client].train, a.meta, a.start, e.device,
                                  programs=e.programs, feedback=self.feedback.setdefault(a.client, {}))
        from .ray_engine import WorkerLost

        assert self.pool is not None
        try:
            update, report, feedback = self.pool.take(call)
        except WorkerLost as exc:
            return Returned(a, failure=f"client {a.client}: {exc}")
        self.feedback[a.client] = feedback  # the device's error feedback, as it would keep it
        return update, report

    def drop_call(self, a: Assignment) -> None:
        """Forget ``a``'s training in a Ray worker (not started: taken out of the queue)."""
        call = self.calls.pop((a.client, a.round), None)
        if call is not None and self.pool is not None:
            self.pool.discard(call)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def carry_out(self, a: Assignment) -> Returned:
        """Train one assignment in-process, as the device would (and, for a contaminated client
        under an update attack, corrupt what it sends)."""
        e = self.engine
        got = self._trained(a)
        if isinstance(got, Returned):  # its worker died
            return got
        update, report = got
        attack = e.cfg.contamination.attack
        if a.client in e.contaminated and attack in UPDATE_ATTACKS:
            update = attack_update(update, a, attack, e.cfg.contamination,
                                   hash_seed(e.cfg.seed, a.round, "attack|" + a.client))
        return Returned(a, update, report)

    def run_round(self, round_idx: int) -> dict:
        e = self.engine
        if e.secagg is not None:
            return self.secure_round(round_idx)
        t0 = time.perf_counter()
        assignments, skipped = e.open_round(round_idx)
        e.reporter.round_start(round_idx, len(assignments))
        returned = []
        # an attack on the round's honest updates: every client trains honestly first, then the
        # contaminated ones send what the round's updates make them craft (held back till then)
        attack = e.cfg.contamination.attack
        view = RoundView(e.R) if attack in ROUND_ATTACKS and e.contaminated else None
        held = []
        self.prefetch(assignments)
        pending: list[Assignment | None] = list(assignments)
        del assignments
        for i, a in enumerate(pending):
            assert a is not None
            ret = self.carry_out(a)
            e.reporter.client_done(a.client, ret.report, a.plan.rank)
            if ret.failure is not None:
                returned.append(ret)
                pending[i] = None
                continue
            if view is not None:
                view.add(a, ret.update or b"")
                if a.client in e.contaminated:
                    held.append(ret)
                    continue
            returned.append(self._settle(ret))
            pending[i] = None  # its start blob is released with it
        for ret in held:
            assert view is not None  # only a round under a round attack holds updates back
            crafted = view.craft(ret.assignment, ret.update or b"", attack, e.cfg.contamination)
            returned.append(self._settle(Returned(ret.assignment, crafted, ret.report)))
        return e.close_round(round_idx, returned, skipped, t0, annotate=self._time_round)

    def secure_round(self, round_idx: int) -> dict:
        """A round under ``privacy.secure_aggregation``: every device's half of SecAgg+ runs here as it
        would on the device (:func:`fedlora_edge.core.secagg.run_round`), over real keys, shares and
        masks: a device trains after the keys are shared and masks what it would send; the
        coordinator's half sees only what a coordinator would.  Devices in ``drop_before_masking``
        vanish after sharing their keys, those in ``drop_after_masking`` after their masked vector
        (tests)."""
        from fedlora_edge.core.secagg import SecAggError, run_round, vector_length

        e = self.engine
        t0 = time.perf_counter()
        assignments, skipped = e.open_round(round_idx)
        e.reporter.round_start(round_idx, len(assignments))
        reports: dict[str, dict] = {}
        self.prefetch(assignments)

        died: dict[str, str] = {}

        def trained(a: Assignment):
            def vector() -> np.ndarray | None:
                ret = self.carry_out(a)
                e.reporter.client_done(a.client, ret.report, a.plan.rank)
                if ret.failure is not None:  # its worker died: the device drops out before its masked vector
                    died[a.client] = ret.failure
                    return None
                reports[a.client] = ret.report or {}
                return np.frombuffer(ret.update or b"", dtype="<u4").astype(np.uint32)
            return vector

        length = vector_length(e.dims, e.R, e.method.sends_scores)
        survivors: list[str] = []
        why = "dropped out of secure aggregation before its masked vector"
        try:
            words, survivors, stats = run_round({a.client: trained(a) for a in assignments}, e.secagg_context,
                                                e.secagg_params, self.drop_before_masking, self.drop_after_masking,
                                                length=length)
            dropped = sorted({a.client for a in assignments} - set(survivors))
            e.fold.acc.load(words, survivors, {"dropped_before_masking": dropped, "bytes": stats["bytes"]})
        except SecAggError as exc:
            why = str(exc)
        for a in assignments:  # devices the protocol never asked to mask (it stopped): their training is dropped
            self.drop_call(a)
        returned = []
        for a in assignments:
            if a.client in survivors:
                e.offer(a.client, Contribution(a.client, a.plan, {}, e.secagg_weights[a.client]))
                returned.append(Returned(a.released(), None, reports[a.client], update_len=4 * length, folded=True))
            else:
                returned.append(Returned(a.released(), failure=died.get(a.client) or (
                    why if a.client not in self.drop_before_masking
                    else "dropped out of secure aggregation before its masked vector")))
        return e.close_round(round_idx, returned, skipped, t0, annotate=self._time_round)

    def _settle(self, ret: Returned) -> Returned:
        """Validate an update as soon as it is trained and fold it into the round's aggregation
        (:meth:`Engine.offer`); keep neither its bytes nor its start blob, so a round of a
        streaming method holds its running sums only, and any other one the decoded factors its
        maths needs.  A rejected update is kept as it came, for the round to record its rejection."""
        from .validate import UpdateRejected

        a = ret.assignment
        try:
            contribution = self.engine.accept(a, ret.update or b"", ret.report)
        except (UpdateRejected, ValueError):
            return ret
        self.engine.offer(a.client, contribution)  # devices train in assignment order: folded at once
        return Returned(a.released(), None, ret.report, update_len=len(ret.update or b""), folded=True)

    def run(self) -> dict:
        try:
            self.engine.begin()
            if self.engine.cfg.schedule.mode == "buffered":
                self.run_buffered()
                return self.engine.finish()
            self.clock = 0.0
            for r in range(1, self.engine.cfg.rounds + 1):
                if self.engine.stop_for_privacy():
                    break
                self.run_round(r)
            return self.engine.finish()
        finally:
            self.close()

    def _round_s(self, client: str) -> float:
        """A device's predicted round (download, local steps, upload): its update's time on the clock."""
        c = self.engine.by_id[client]
        return c.capacity.round_s if c.capacity else 0.0

    def _time_round(self, record: dict) -> None:
        """A synchronous round on the fleet's profile timings (what ``schedule.mode: buffered`` is
        compared with): it lasts as long as its slowest device's predicted round; the others wait."""
        own = [self._round_s(c["client"]) for c in record["clients"]]
        longest = max(own, default=0.0)
        self.clock += longest
        record["virtual_seconds"] = round(self.clock, 3)
        record["waiting_seconds"] = round(sum(longest - t for t in own), 3)

    def run_buffered(self) -> None:
        """``schedule.mode: buffered`` (FedBuff): ``concurrency`` devices train at once, each on a plan
        against the version current when it was handed out; its update arrives after its device's
        predicted round time (its profile: download, steps, upload) on a virtual clock, so a run is
        the same for the same seed.  Every ``buffer`` accepted updates, in arrival order, are folded
        in the method's own arithmetic into a new version (a "round" of the report).  An update
        ``tau`` versions old is moved onto the current version with its change scaled by
        ``1 / (1 + sqrt(tau))`` (its change from the start it was planned on, scaled, added to the
        plan's start now), or refused past ``schedule.max_staleness``.  A device is handed a new plan
        as soon as it is idle, unless it has an update in the buffer, or its update was refused, or
        the method planned nothing for it, in this version.  When nothing is left in flight the
        version is published with what it has (failed below ``min_updates``), so a run always ends
        after ``rounds`` versions.  A device trains when its update is due (the plan and its start
        are fixed when it is handed out), so no training is spent on an update that is refused as
        stale or left in flight at the end (with ``--engine ray`` a worker trains it when it is handed
        out; a refused one is taken out of the queue if it has not started, else its result dropped)."""
        import heapq
        import random

        from .validate import UpdateRejected

        e = self.engine
        cfg, sc = e.cfg, e.cfg.schedule
        size = min(sc.buffer or cfg.clients_per_round, max(1, len(e.participants)))
        concurrency = sc.concurrency or cfg.clients_per_round
        rng = random.Random(f"buffered|{cfg.seed}")
        version, seq = 0, 0
        self.clock = 0.0
        flight: list = []  # (arrival time, seq, client), heap
        held: dict[str, tuple] = {}  # client -> (assignment, exact start, version planned on)
        buffer: list[tuple[Returned, Contribution, int]] = []
        rejected: list[dict] = []
        skipped: list[dict] = []
        out: set[str] = set()  # not handed a plan again in this version: refused, or the method planned nothing
        t0 = time.perf_counter()

        def dispatch() -> None:
            nonlocal seq
            while len(held) < concurrency:
                waiting = {r.assignment.client for r, _, _ in buffer}
                pool = sorted(c.id for c in e.participants if c.id not in held and c.id not in waiting
                              and c.id not in out)
                if not pool:
                    return
                cid = rng.choice(pool)
                a, skip = e.assign(e.by_id[cid], version + 1)
                if a is None:
                    out.add(cid)
                    skipped.append(skip)
                    continue
                heapq.heappush(flight, (self.clock + self._round_s(cid), seq, cid))
                seq += 1
                held[cid] = (a, e.start_tensors(cid, a.plan), version)
                self.prefetch([a])  # a Ray worker trains it now (its plan and start are fixed)

        def publish() -> None:
            nonlocal version, buffer, skipped, rejected, out, t0
            version += 1
            fold_version(e, version, buffer, skipped, rejected, t0,
                         annotate=lambda record: record.update(virtual_seconds=round(self.clock, 3)))
            buffer, skipped, rejected, out = [], [], [], set()
            t0 = time.perf_counter()
            if version < cfg.rounds:
                e.reporter.round_start(version + 1, size)

        e.reporter.round_start(1, size)
        while version < cfg.rounds:
            dispatch()
            if not flight:  # nobody left to wait for in this version: it closes with what it has
                publish()
                continue
            self.clock, _, cid = heapq.heappop(flight)
            a, start, planned = held.pop(cid)
            tau = version - planned
            why = too_stale(planned, version, sc.max_staleness)
            if why:
                out.add(cid)
                rejected.append({"client": cid, "reason": why})
                self.drop_call(a)  # what a Ray worker trains or trained for it is dropped
                continue
            ret = self.carry_out(a)
            if ret.failure is not None:  # its worker died
                out.add(cid)
                rejected.append({"client": cid, "reason": ret.failure})
                continue
            try:
                contribution = e.accept(a, ret.update or b"", ret.report, start=start)
                if tau:
                    contribution = moved(contribution, start, e.start_tensors(cid, a.plan),
                                         staleness_scale(tau, sc.staleness_weight))
            except (UpdateRejected, ValueError) as exc:
                out.add(cid)
                rejected.append({"client": cid, "reason": str(exc)})
                continue
            buffer.append((ret, contribution, tau))
            e.reporter.client_done(cid, ret.report, a.plan.rank)
            if len(buffer) == size:
                publish()

