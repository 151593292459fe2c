"""LoRA arithmetic as plain tensor ops, shared by every stage (client and cloud)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout drawn from an explicit generator, so split and local runs draw the same mask.

    The mask is drawn on the generator's device (a CPU generator everywhere in tandem) and moved to x's, so a run
    on a GPU draws the masks a CPU run draws.
    """
    if p <= 0.0:
        return x
    where = generator.device if generator is not None else x.device
    keep = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device) >= p
    return x * keep / (1.0 - p)


def lora_delta(
    x: torch.Tensor,  # (..., in)
    a: torch.Tensor,  # (r, in)
    b: torch.Tensor,  # (out, r)
    scaling: float,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns scaling * B(A(dropout(x))), in peft's operation order and dtype rule.

    The dtype rule (peft's `_cast_input_dtype`): the delta is computed in the wider of x's and the LoRA's dtypes.
    LoRA master weights are float32, so beside a bfloat16 or float16 base layer x is cast up to float32 (before
    the dropout) and the delta is float32; `add_delta` then rounds the sum once to the base layer's dtype. A and
    B move to x's device (a differentiable copy, so their gradients reach the masters wherever those live).
    In float32 every cast here is the identity: the float32 path is what it always was.
    """
    dtype = torch.promote_types(x.dtype, a.dtype)
    x, a, b = x.to(dtype), a.to(x.device, dtype), b.to(x.device, dtype)
    return F.linear(F.linear(dropout_(x, dropout_p, generator), a), b) * scaling  # (..., out)


def add_delta(out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The base layer's output plus a LoRA delta, as peft adds them: the sum in the promoted dtype (float32 beside a
    half-precision base), cast back to the base layer's dtype once. The same on the client and in the cloud."""
    return (out + delta).to(out.dtype)
