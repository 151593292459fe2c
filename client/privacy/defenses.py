"""Defenses at the bottom cut: per-token clipping plus Gaussian noise, and the (epsilon, delta) it implies."""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass, field

import torch

DELTA = 1e-5  # the delta every epsilon in tandem's reports is stated at


@dataclass
class CutNoise:
    """Clips every token's hidden state to an L2 norm and adds Gaussian noise (the Gaussian mechanism).

    Used as `StagedModel.cut_transform`: it runs on the bottom stage's output before it leaves the
    client, in training and in evaluation (the cloud receives both). Its noise is drawn from a generator
    seeded with a hash of the run's secret and the step's seed: the step's seed alone is no secret (every
    Forward carries a dropout seed it can be derived from), so a cloud that knew the draw could subtract it.

    Attributes:
        noise_multiplier: sigma / C; 0 means clipping only.
        clip_norm: C for every position but the first.
        first_clip_norm: C for position 0, whose state is far larger in Llama-family models (the
            attention sink); 0 means the same as clip_norm.
        secret: 32 random bytes the noise is keyed with; kept in the run's private checkpoint, never in
            the privacy context. None (an attacker's copy of the settings) draws from the step's seed alone.
    """

    noise_multiplier: float
    clip_norm: float
    first_clip_norm: float = 0.0
    secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.clip_norm <= 0 or self.first_clip_norm < 0:
            raise ValueError(f"clip norms must be > 0, got {self.clip_norm} and {self.first_clip_norm}")

    def bounds(self, h: torch.Tensor) -> torch.Tensor:
        """Per-position clip norms for hidden states (B, T, H); returns (1, T, 1)."""
        c = torch.full((1, h.shape[1], 1), float(self.clip_norm), dtype=h.dtype, device=h.device)
        if self.first_clip_norm:
            c[:, 0] = float(self.first_clip_norm)
        return c

    def clip(self, h: torch.Tensor) -> torch.Tensor:
        """Scales each token's state down to its clip norm (differentiable)."""
        c = self.bounds(h)  # (1, T, 1)
        norm = h.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, T, 1)
        return h * (c / norm).clamp(max=1.0)

    def noise(self, shape, seed: int) -> torch.Tensor:
        """The noise added for one release: N(0, (noise_multiplier * C_t)^2) per coordinate."""
        if self.secret is not None:
            z = keyed_normal(shape, self.secret + int(seed).to_bytes(8, "little"))  # (B, T, H)
        else:  # an attacker's guess: the step's seed alone (torch's generator keeps only 32 bits of any seed)
            z = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
        return z * self.bounds(z) * self.noise_multiplier

    def __call__(self, h, attention_mask, step: int, seed: int, train: bool) -> torch.Tensor:
        out = self.clip(h)
        if self.noise_multiplier > 0:
            out = out + self.noise(h.shape, seed).to(h.device, h.dtype)  # drawn on the CPU on every device
        return out

    def describe(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "first_clip_norm": self.first_clip_norm or self.clip_norm,
        }


def keyed_normal(shape, key: bytes) -> torch.Tensor:
    """Standard normal draws (float32) from a generator keyed with all 128 bits of sha256(key).

    Not torch.Generator: it keeps only the low 32 bits of a seed, so a cloud could try every seed and keep
    the one whose subtraction leaves a clipped state.
    """
    import numpy as np

    digest = hashlib.sha256(key).digest()
    generator = np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))
    return torch.from_numpy(generator.standard_normal(tuple(shape), dtype=np.float32))


def new_secret() -> bytes:
    """A fresh key for a run's cut noise."""
    return secrets.token_bytes(32)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def gaussian_delta(epsilon: float, ratio: float) -> float:
    """Exact delta of the Gaussian mechanism at epsilon (Balle and Wang 2018); ratio = sigma / sensitivity."""
    a, b = 1.0 / (2.0 * ratio), epsilon * ratio
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b) if epsilon < 700 else 0.0


def gaussian_epsilon(ratio: float, delta: float = DELTA) -> float:
    """Smallest epsilon with gaussian_delta(epsilon) <= delta (bisection); inf without noise."""
    if ratio <= 0:
        return math.inf
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, ratio) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if gaussian_delta(mid, ratio) <= delta else (mid, hi)
    return hi


def zcdp_epsilon(ratio: float, releases: int, delta: float = DELTA) -> float:
    """Epsilon after `releases` Gaussian releases with sigma / sensitivity = ratio (zCDP composition)."""
    if ratio <= 0:
        return math.inf
    rho = releases / (2.0 * ratio**2)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def dp_statement(noise: CutNoise | None, seq_len: int, passes: int, delta: float = DELTA) -> dict:
    """The (epsilon, delta) figures the cut noise implies, with their assumptions.

    Args:
        noise: The defense, or None.
        seq_len: Tokens per sequence (one token can change the states of every later position).
        passes: How many times each sequence is sent in the run (epochs plus evaluation passes).
        delta: The delta of every figure.
    """
    if noise is None or noise.noise_multiplier <= 0:
        return {
            "epsilon_per_release": None,
            "epsilon_per_token_run": None,
            "delta": delta,
            "assumptions": "no noise at the cut: no differential-privacy guarantee",
        }
    ratio = noise.noise_multiplier / 2.0  # sensitivity 2C: a clipped vector can move anywhere in its ball
    return {
        "epsilon_per_release": gaussian_epsilon(ratio, delta),
        "epsilon_per_token_run": zcdp_epsilon(ratio, seq_len * passes, delta),
        "delta": delta,
        "assumptions": (
            "Gaussian mechanism on each clipped hidden vector (L2 sensitivity 2C under replacement, sigma = "
            "noise_multiplier * C). epsilon_per_release covers ONE hidden vector in ONE release, not the run. "
            f"epsilon_per_token_run composes (zCDP) the {seq_len} x {passes} releases one token can influence "
            "(its own and every later position of its sequence, in every pass over it); it assumes the "
            "noise is independent across releases and ignores the weights the cloud already knows."
        ),
    }
