"""Secure aggregation on the coordinator's side (``privacy.secure_aggregation``): a round's
aggregate from the sum that SecAgg+ (:mod:`fedlora_edge.core.secagg`) reveals, never from one
device's update.

Each device sends one vector (:func:`fedlora_edge.core.secagg.contribution`): its weighted change
in the global adapter's coordinates, its weight per component and in total, and HAFL's weighted
scores.  Their sum holds exactly what :class:`~fedlora_edge.coordinator.aggregate.ComponentAverager`
accumulates from plain updates (the numerators, the weight per component, the total weight), so
the method's mean (each component over its trainers, or over every participant) is the same
arithmetic on the same sums, up to the encoding's rounding (one step of
``2 clip_range / (levels - 1)`` per device and coordinate, unbiased).  With ``privacy.dp`` too, the
noise goes on those sums (:class:`~fedlora_edge.coordinator.privacy.NoisedSum`): clipped on the
device, noised on the sum.

A device's weight is the coordinator's own (its example count capped as in a plain run, or 1 under
``weights.policy: equal`` or DP), scaled by the round's largest so that it fits the clip range; the
device multiplies its change by it before encoding.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedlora_edge.core.secagg import Params, decode_sum, split_sum

from .aggregate import ComponentAverager

TRAINED = 1e-6  # a component whose summed weight is above this was trained (weights are at least 1e-4)


class SecureSum:
    """A round's accumulator under secure aggregation.  The round's fold offers each surviving
    device as a contribution without factors (:meth:`add` only checks that it has none); the round's driver hands
    over the unmasked sum with :meth:`load`; :meth:`finish` gives the method's mean (or, with
    ``noised``, DP's noised mean) and the round's record."""

    def __init__(self, global_factors, rule: str, dims: Mapping[str, tuple[int, int]], rank: int, scores: bool,
                 params: Params, noised=None, then=None):
        self.global_factors = global_factors
        self.rule = rule
        self.dims = dims
        self.rank = rank
        self.scores = scores
        self.params = params
        self.noised = noised      # a NoisedSum (privacy.dp) that takes the sums, else None
        self.then = then          # HAFL: then(scores, trained)
        self.words: np.ndarray | None = None
        self.survivors: list[str] = []
        self.stats: dict = {}

    def add(self, contribution) -> None:
        if contribution.factors:
            raise ValueError(f"client {contribution.client}: an update in the clear under secure aggregation")

    def load(self, words: np.ndarray, survivors: list[str], stats: dict | None = None) -> None:
        """The unmasked sum (words) of ``survivors``' vectors, and what to record of the protocol."""
        self.words, self.survivors, self.stats = words, list(survivors), dict(stats or {})

    def finish(self):
        if self.words is None:
            raise ValueError("secure aggregation: the round's sum was never unmasked")
        total = decode_sum(self.words, len(self.survivors), self.params)
        parts = split_sum(total, self.dims, self.rank, self.scores)
        num, z = {}, {}
        for m, (ga, gb) in self.global_factors.items():
            num[m] = (torch.from_numpy(parts[(m, "A")].copy()).to(ga.dtype),
                      torch.from_numpy(parts[(m, "B")].copy()).to(gb.dtype))
            w = torch.from_numpy(parts[(m, "z")].copy()).to(ga.dtype)
            z[m] = torch.where(w > TRAINED, w, torch.zeros_like(w))
        avg = ComponentAverager.from_sums(self.global_factors, self.rule, num, z, float(parts[("", "total")][0]))
        score_sums = {m: torch.from_numpy(parts[(m, "score")].copy()) for m in self.dims} if self.scores else None
        if self.noised is not None:
            self.noised.load(avg, score_sums)
            factors, _ = self.noised.finish()
        else:
            factors = avg.result()
            if self.scores and self.then is not None:
                means = {}
                for m in self.dims:
                    w = torch.from_numpy(parts[(m, "scorers")].copy())
                    means[m] = (torch.from_numpy(parts[(m, "score")].copy()) / w.clamp(min=TRAINED)).where(
                        w > TRAINED, float("nan"))
                self.then(means, z)
        record = {"secure_aggregation": {"survivors": len(self.survivors),
                                         "threshold": self.params.threshold, "degree": self.params.degree,
                                         **self.stats}}
        return factors, record
