"""Device-level differential privacy (DP-FedAvg): the pieces that do not depend on a method.

What is protected: the participation and the whole update of any one device, for the sequence of
global adapters the coordinator releases; against anyone who reads those adapters (the devices,
whoever gets the exported model), not against the coordinator itself, which sees each clipped
update before the noise (secure aggregation is what hides those).  The guarantee is
``(epsilon, delta)`` at the device level: add or remove one device's data entirely.

- **Sampling that earns its amplification.**  Each round, every eligible device takes part
  independently with probability ``q = clients_per_round / eligible`` (:func:`poisson_sample`),
  so the accountant's Poisson subsampling is the sampling actually done.  (Drawing a fixed number
  without replacement, as a run without DP does, would need another accountant; a system that
  samples one way and accounts the other over-promises.)
- **Clipping.**  A device's update (every tensor it sends, as one vector, minus what it started
  from) is scaled to norm at most ``clip_norm`` (:func:`fedlora_edge.core.clip.clip_update`), on the device.
- **Noise.**  The coordinator adds ``N(0, (z C)^2)`` to each coordinate of the sum of the round's
  clipped updates and divides by a fixed denominator (the expected number of participants), never
  by the number that came (:func:`gaussian_noise`).
- **Importance scores** (HAFL): a device sends its scores scaled to norm 1
  (:func:`fedlora_edge.core.clip.unit_norm`); the coordinator checks the bound, noises their sum as
  it noises the updates' and divides by the expected scorers; the components are ranked by those
  noised fleet scores alone (a device's own scores are never kept).  The round then releases two
  noised sums, each with ``sqrt(2)`` times the noise multiplier, which together cost what one at
  ``z`` does (:func:`update_noise_multiplier`).
- **Adaptive clipping** (Andrew et al., 2021; Flower's defaults): ``C <- C exp(-lr (b - gamma))``
  with ``b`` the noised fraction of updates whose norm was at most ``C`` (:func:`adaptive_clip`).
- **Accounting** with Opacus's RDP accountant (or its PRV accountant), whose figures for this
  sampling match an independent accountant's (tests/test_privacy.py): for 1000 devices, 100 a
  round, 200 rounds, ``z = 1``, ``delta = 1e-3``: RDP 8.18, PRV 7.11; without amplification (each
  round as if every device took part, Flower's only mode) 150.7.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are handled: the config reads this module
    import torch

ACCOUNTANTS = ("rdp", "prv")


class PrivacyError(ConfigError):
    """A privacy setting that cannot hold; the message names it."""


# why a built-in method has no device-level DP variant (its aggregate is not a sum of clipped changes)
NO_DP = {
    "flexlora": "its SVD redistributes the product of every device's factors, not a sum of clipped changes",
    "median": "a coordinate-wise median reads individual updates; noise on a sum does not cover it",
    "trimmed-mean": "a trimmed mean reads individual updates; noise on a sum does not cover it",
    "multi-krum": "Krum scores individual updates against each other; noise on a sum does not cover it",
    "clair": "its low-rank plus sparse recovery reads every update to find the contaminated ones",
    "fedlease": "its clustering reads each device's adapter, and each cluster's expert is one group's mean",
    "local": "it releases each device's own adapter",
    "centralized": "it pools every device's data on the server",
}


def dp_refusal(method, names) -> str | None:
    """Why ``method`` cannot run under ``privacy.dp`` (None when it can)."""
    if _is_a_sum(method):
        return None
    why = NO_DP.get(method.name, "it declares no DP variant (dp_normalise)")
    return f"method {method.name} has no device-level DP variant: {why}; methods that have one: {_sums(names)}"


def secagg_refusal(method, names) -> str | None:
    """Why ``method`` cannot run under ``privacy.secure_aggregation`` (None when it can): its
    aggregate must be a sum of the devices' changes, as DP needs (``dp_normalise``)."""
    if _is_a_sum(method):
        return None
    why = NO_DP.get(method.name, "it declares no sum-based aggregate (dp_normalise)")
    return (f"method {method.name} cannot run with secure aggregation, where the coordinator sees only the sum: "
            f"{why}; methods that can: {_sums(names)}")


# methods whose aggregate is a sum under DP but whose own rule reads a round's updates together
NOT_STREAMING = {"norm-bound": "its bound is the median of a round's update norms, which needs every update at once"}


def buffered_refusal(method, names) -> str | None:
    """Why ``method`` cannot run in buffered rounds (None when it can): each update must fold into
    a running sum on its own (``dp_normalise``, and not a rule that reads the round's updates together)."""
    if _is_a_sum(method) and method.name not in NOT_STREAMING:
        return None
    why = NOT_STREAMING.get(method.name) or NO_DP.get(method.name, "it declares no sum-based aggregate (dp_normalise)")
    able = ", ".join(n for n in _sums(names).split(", ") if n not in NOT_STREAMING)
    return (f"method {method.name} cannot run in buffered rounds, which fold each update on its own into a running "
            f"sum: {why}; methods that can: {able}")


def _is_a_sum(method) -> bool:
    return method.dp_normalise in ("trainers", "all")


def _sums(names) -> str:
    """The methods of ``names`` whose aggregate is a sum of the devices' changes."""
    from .methods import get_method

    return ", ".join(sorted(n for n in names if _is_a_sum(get_method(n))))


def poisson_sample(ids: Sequence[str], rate: float, rng: random.Random | None = None) -> list[str]:
    """The devices of ``ids`` that take part in a round: each independently with probability
    ``rate``, in sorted order.  ``rng``: by default the operating system's CSPRNG: the
    amplification by sampling holds only against someone who cannot know the draw, so it never
    comes from the run's seed, which the config and the report show."""
    if not 0.0 < rate <= 1.0:
        raise PrivacyError(f"sampling rate must be in (0, 1], got {rate}")
    rng = rng or random.SystemRandom()
    return [d for d in sorted(ids) if rng.random() < rate]


def noise_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's CSPRNG (never from the run's seed, which
    is public: noise that can be regenerated can be subtracted)."""
    import secrets

    import torch

    return torch.Generator().manual_seed(secrets.randbits(63))


def gaussian_noise(shape: Sequence[int], std: float, generator: torch.Generator) -> torch.Tensor:
    """``N(0, std^2)`` noise of ``shape`` (float32), drawn from ``generator``."""
    import torch

    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).mul_(std).float()


def adaptive_clip(clip_norm: float, unclipped: int, expected_participants: float, settings: DPSettings,
                  generator: torch.Generator) -> float:
    """The next round's clip: ``C exp(-lr (b - target_quantile))``, ``b`` the fraction of the
    round's updates whose norm was at most ``C`` (``unclipped`` of them), counted with Gaussian
    noise of ``clipped_count_stddev`` (default: the expected participants / 20) and divided by the
    expected number of participants (fixed, not the number that came)."""
    import torch

    expected = max(1.0, expected_participants)
    stddev = count_stddev(settings, expected_participants)
    noised = unclipped + float(torch.randn((), generator=generator, dtype=torch.float64)) * stddev
    b = noised / expected
    return clip_norm * math.exp(-settings.clip_lr * (b - settings.target_quantile))


def update_noise_multiplier(settings: DPSettings, expected_participants: float, sums: int = 1) -> float:
    """The noise multiplier of each noised sum a round releases (``sums``: the updates', and HAFL's
    importance scores' as a second), in units of its own bound.  Gaussian releases of one round
    compose as one whose ``z^-2`` is the sum of theirs, so ``sums`` sums of multiplier ``z_s`` cost
    what one of ``z = z_s / sqrt(sums)`` would: ``z_s = sqrt(sums) z``.  With adaptive clipping the
    noised count of unclipped updates is one more release (noise ``sigma_b``, sensitivity 1/2 in the
    count's units), so ``z_s = sqrt(sums) (z^-2 - (2 sigma_b)^-2)^-1/2`` (Andrew et al. 2021,
    Flower's adaptive-clipping wrappers) and all of them together cost what ``z`` alone would: the
    accountant counts ``z``.  ``sigma_b`` must exceed ``z / 2``."""
    z = settings.noise_multiplier
    if not settings.adaptive_clipping:
        return math.sqrt(sums) * z
    sigma_b = count_stddev(settings, expected_participants)
    if 2 * sigma_b <= z:
        raise PrivacyError(f"privacy.dp.clipped_count_stddev: {sigma_b:.3g} (expected participants / 20 unless "
                           f"set) must exceed noise_multiplier / 2 = {z / 2:g} for adaptive clipping to fit in "
                           "the budget; set it higher, or sample more devices a round")
    return math.sqrt(sums) * (z ** -2 - (2 * sigma_b) ** -2) ** -0.5


def count_stddev(settings: DPSettings, expected_participants: float) -> float:
    """The noise on the count of unclipped updates (adaptive clipping)."""
    return (settings.clipped_count_stddev if settings.clipped_count_stddev is not None
            else max(1.0, expected_participants) / 20)


@dataclass(frozen=True)
class DPSettings:
    """``privacy.dp``.  ``noise_multiplier`` 0 turns DP off."""

    noise_multiplier: float = 0.0         # z: the noise's standard deviation in units of the clip
    clip_norm: float = 0.1                # C (the initial one with adaptive clipping; Flower's default 0.1)
    target_delta: float | None = None     # default 1 / (eligible devices)
    max_epsilon: float = math.inf         # the run stops before a round would take epsilon past this
    accountant: str = "rdp"               # rdp | prv (Opacus's)
    adaptive_clipping: bool = False
    target_quantile: float = 0.5          # adaptive: the fraction of updates the clip should leave unclipped
    clip_lr: float = 0.2                  # adaptive: the geometric step
    clipped_count_stddev: float | None = None  # adaptive: the count's noise (default expected / 20)

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def __post_init__(self):
        if self.noise_multiplier < 0:
            raise PrivacyError(f"privacy.dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.clip_norm <= 0:
            raise PrivacyError(f"privacy.dp.clip_norm must be positive, got {self.clip_norm}")
        if self.target_delta is not None and not 0.0 < self.target_delta < 1.0:
            raise PrivacyError(f"privacy.dp.target_delta must be in (0, 1), got {self.target_delta}")
        if not self.max_epsilon > 0:
            raise PrivacyError(f"privacy.dp.max_epsilon must be positive, got {self.max_epsilon}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"privacy.dp.accountant must be one of {', '.join(ACCOUNTANTS)}, got '{self.accountant}'")
        if not 0.0 < self.target_quantile < 1.0:
            raise PrivacyError(f"privacy.dp.target_quantile must be in (0, 1), got {self.target_quantile}")
        if self.clip_lr <= 0:
            raise PrivacyError(f"privacy.dp.clip_lr must be positive, got {self.clip_lr}")


@dataclass(frozen=True)
class SecureAggregationSettings:
    """``privacy.secure_aggregation``: the coordinator learns each round's sum, never one device's
    update (SecAgg+, :mod:`fedlora_edge.core.secagg`; docs/security.md)."""

    enabled: bool = False
    clip_range: float = 1.0        # every summed value is clipped on the device to [-clip_range, clip_range]
    dropout: float = 0.3           # the fraction of a round's devices the default degree must survive dropping out
    degree: int | None = None      # neighbours per device (default: from dropout and the round's size, core/secagg.py)
    threshold: int | None = None   # shares that rebuild a device's secrets (default: a neighbourhood's majority)

    def __post_init__(self):
        if not self.clip_range > 0:
            raise PrivacyError(f"privacy.secure_aggregation.clip_range must be positive, got {self.clip_range}")
        if not 0.0 <= self.dropout < 0.5:
            raise PrivacyError(f"privacy.secure_aggregation.dropout must be in [0, 0.5) (a majority must answer), got "
                               f"{self.dropout}")
        if self.degree is not None and self.degree < 2:
            raise PrivacyError(f"privacy.secure_aggregation.degree must be at least 2, got {self.degree}")
        if self.threshold is not None and self.threshold < 2:
            raise PrivacyError(f"privacy.secure_aggregation.threshold must be at least 2 (one neighbour alone must "
                               f"not unmask a device), got {self.threshold}")


@dataclass(frozen=True)
class PrivacySettings:
    """``privacy:``: device-level differential privacy (``dp``) and secure aggregation
    (``secure_aggregation``)."""

    dp: DPSettings = field(default_factory=DPSettings)
    secure_aggregation: SecureAggregationSettings = field(default_factory=SecureAggregationSettings)


class Accountant:
    """The privacy spent so far by rounds of Poisson-sampled Gaussian sums (Opacus's accountant).
    A round's ``(noise_multiplier, sample_rate)`` may change from round to round (adaptive
    clipping does not change them: the clip is a scale)."""

    def __init__(self, kind: str = "rdp"):
        if kind not in ACCOUNTANTS:
            raise PrivacyError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got '{kind}'")
        self.kind = kind
        self.history: list[tuple[float, float, int]] = []  # (z, q, rounds), Opacus's own form

    def _opacus(self, history: list[tuple[float, float, int]]):
        from opacus.accountants import PRVAccountant, RDPAccountant

        acc = RDPAccountant() if self.kind == "rdp" else PRVAccountant()
        acc.history = list(history)
        return acc

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` after the rounds stepped so far (0 before any)."""
        return float(self._opacus(self.history).get_epsilon(delta)) if self.history else 0.0

    def epsilon_after_next(self, noise_multiplier: float, sample_rate: float, delta: float) -> float:
        """Epsilon at ``delta`` if one more such round ran (the budget check before a round)."""
        probe = Accountant(self.kind)
        probe.history = list(self.history)
        probe.step(noise_multiplier, sample_rate)
        return probe.epsilon(delta)


def epsilon_for(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon of ``rounds`` rounds at one ``(z, q)``."""
    acc = Accountant(kind)
    if rounds > 0:
        acc.history = [(noise_multiplier, sample_rate, rounds)]
    return acc.epsilon(delta)


def no_amplification_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon when sampling earns no amplification (each round counted as if every device took
    part; the only mode Flower's accountant accepts), RDP."""
    return epsilon_for(noise_multiplier, 1.0, rounds, delta, "rdp")


class NoisedSum:
    """DP-FedAvg's aggregate of one round, as a streaming accumulator (``add`` / ``finish``): per
    module and global component ``j``, ``c_j <- c_j + (sum_k (c_kj - c_j) + N(0, (z C)^2)) / E_j``
    over the round's clipped contributions ``k`` (each of weight 1: the engine's weight under DP),
    where ``E_j`` is the expected number of devices that train ``j`` this round (fixed before the
    round: the sampling rate times the eligible devices whose plan has ``j``), not the number that
    came.  The sums are :class:`~fedlora_edge.coordinator.aggregate.ComponentAverager`'s.  A
    component no eligible device trains keeps its value (its noise is not released).  The noise is
    drawn at ``finish`` from ``generator``.

    ``scorers`` (HAFL): per module, the expected number of devices that score each component.  Each
    contribution's importance scores (norm at most 1 over all its modules, checked on arrival) are
    summed per component too, noised with ``N(0, score_std^2)`` and divided by ``scorers``; at
    ``finish``, ``then(noised, expected)`` gets them (``nan`` where nobody was expected to score)
    with the expected trainers, and the method ranks by them alone."""

    def __init__(self, global_factors: Mapping, expected: Mapping[str, torch.Tensor], std: float,
                 generator: torch.Generator, scorers: Mapping[str, torch.Tensor] | None = None,
                 score_std: float = 0.0, then=None):
        import torch

        from .aggregate import ComponentAverager

        self.global_factors = global_factors
        self.expected = expected
        self.std = std
        self.generator = generator
        self.sum = ComponentAverager(global_factors, "trainers")
        self.scorers = scorers
        self.score_std = score_std
        self.then = then
        self.score_sums = {m: torch.zeros(len(e), dtype=torch.float64) for m, e in (scorers or {}).items()}

    def load(self, averager, score_sums: Mapping[str, torch.Tensor] | None = None) -> None:
        """Take the round's sums from ``averager`` (a ComponentAverager built from secure
        aggregation's sum) instead of from contributions: the noise goes on the same sums."""
        self.sum = averager
        for module, total in (score_sums or {}).items():
            if module in self.score_sums:
                self.score_sums[module] = total.double().clone()

    def add(self, c) -> None:
        self.sum.add(c)
        for module, scores in c.importance.items():
            if module in self.score_sums:
                self.score_sums[module][list(c.plan.scored(module))] += scores.double()

    def finish(self) -> tuple[dict, dict]:
        out = {}
        sums = self.sum.sums()
        for module, (ga, gb) in self.global_factors.items():
            num_a, num_b = sums[module]
            e = self.expected[module].to(ga.dtype)
            live = e > 0
            na = num_a + gaussian_noise(num_a.shape, self.std, self.generator)
            nb = num_b + gaussian_noise(num_b.shape, self.std, self.generator)
            safe = e.clamp(min=1e-12)
            new_a = ga + na / safe[:, None]
            new_b = gb + nb / safe[None, :]
            out[module] = (new_a.where(live[:, None], ga).clone(), new_b.where(live[None, :], gb).clone())
        if self.scorers is not None:
            noised = {}
            for module, total in self.score_sums.items():
                e = self.scorers[module].double()
                noisy = total + gaussian_noise(total.shape, self.score_std, self.generator).double()
                noised[module] = (noisy / e.clamp(min=1e-12)).where(e > 0, math.nan)
            if self.then is not None:
                self.then(noised, self.expected)
        return out, {}
