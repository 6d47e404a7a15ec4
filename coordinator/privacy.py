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
  from) is scaled to norm at most ``clip_norm`` (:func:`clip_update`), on the device.
- **Noise.**  The coordinator adds ``N(0, (z C)^2)`` to each coordinate of the sum of the round's
  clipped updates and divides by a fixed denominator (the expected number of participants), never
  by the number that came (:func:`gaussian_noise`).
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

import torch

ACCOUNTANTS = ("rdp", "prv")


class PrivacyError(ValueError):
    """A privacy setting or budget that cannot hold; the message names it."""


def poisson_sample(ids: Sequence[str], rate: float, seed: int, round_idx: int) -> list[str]:
    """The devices of ``ids`` that take part in round ``round_idx``: each independently with
    probability ``rate``, drawn from ``(seed, round, device)`` alone, so a device's draw does not
    depend on which others are eligible or on their order.  Sorted."""
    if not 0.0 < rate <= 1.0:
        raise PrivacyError(f"sampling rate must be in (0, 1], got {rate}")
    return sorted(d for d in ids if random.Random(f"dp-sample|{seed}|{round_idx}|{d}").random() < rate)


def update_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of every tensor of ``tensors`` taken as one vector (float64 sums)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """(``delta`` scaled to norm at most ``clip_norm``, its norm before).  An update within the
    bound is returned unchanged (copied)."""
    if clip_norm <= 0:
        raise PrivacyError(f"clip_norm must be positive, got {clip_norm}")
    norm = update_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (t * scale).to(t.dtype) for k, t in delta.items()}, norm


def gaussian_noise(shape: Sequence[int], std: float, generator: torch.Generator) -> torch.Tensor:
    """``N(0, std^2)`` noise of ``shape`` (float32), drawn from ``generator``."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).mul_(std).float()


def adaptive_clip(clip_norm: float, unclipped: int, participants: int, settings: DPSettings,
                  generator: torch.Generator) -> float:
    """The next round's clip: ``C exp(-lr (b - target_quantile))``, ``b`` the fraction of this
    round's ``participants`` whose update norm was at most ``C``, counted with Gaussian noise of
    ``clipped_count_stddev`` (default: the expected participants / 20) and divided by the expected
    number of participants (fixed)."""
    expected = max(1.0, settings.expected_participants)
    stddev = settings.clipped_count_stddev if settings.clipped_count_stddev is not None else expected / 20
    noised = unclipped + float(torch.randn((), generator=generator, dtype=torch.float64)) * stddev
    b = noised / expected
    return clip_norm * math.exp(-settings.clip_lr * (b - settings.target_quantile))


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
    expected_participants: float = field(default=0.0, compare=False)  # set by the run: q x eligible

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
