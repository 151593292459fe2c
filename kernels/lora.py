"""LoRA arithmetic as plain tensor ops, shared by every stage (client and cloud)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout drawn from an explicit generator, so split and local runs draw the same mask."""
    if p <= 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) >= p
    return x * keep / (1.0 - p)


def lora_delta(
    x: torch.Tensor,  # (..., in)
    a: torch.Tensor,  # (r, in)
    b: torch.Tensor,  # (out, r)
    scaling: float,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns scaling * B(A(dropout(x))), in peft's operation order."""
    return F.linear(F.linear(dropout_(x, dropout_p, generator), a), b) * scaling  # (..., out)
