"""The remote LoRA's optimizer, kept in the cloud when a session asks for it (`client tune --cloud-optimizer`).

With the client's own optimizer, every training step sends the whole remote LoRA up and its
gradients down: for rank 8 on SmolLM2's 26 middle blocks that is 3.2 MB per step, ten times the
activations of a 1x32 step. The cloud sees both every step anyway, so it may as well apply the
update itself: the same torch.optim.AdamW with the client's settings, on the same gradients, gives
the same parameters bit for bit. What changes is where the state lives: the client fetches it
(GetRemoteState) for its checkpoints and the exported adapter, and puts it back (PutRemoteState)
to resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidRequest


@dataclass(frozen=True)
class AdamWSpec:
    """torch.optim.AdamW's settings, as the client's optimizer has them."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if not (
            self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0 and self.weight_decay >= 0
        ):
            raise InvalidRequest(
                f"cloud optimizer: invalid AdamW settings {self}; need lr > 0, betas in [0, 1), "
                "eps > 0 and weight_decay >= 0"
            )


class RemoteOptimizer:
    """AdamW over one session's remote LoRA, held as one flat vector in the slots' wire order.

    AdamW is elementwise, so one flat parameter gets exactly the updates the client's optimizer would
    give its separate tensors, in about ten tensor operations per step instead of ten per tensor.
    """

    def __init__(self, spec: AdamWSpec, tensors: list[torch.Tensor]):
        self.spec = spec
        self.shapes = [t.shape for t in tensors]
        self.flat = nn.Parameter(torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0))
        self.opt = torch.optim.AdamW(
            [self.flat], lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps, weight_decay=spec.weight_decay
        )

    @property
    def steps(self) -> int:
        adamw_state = self.opt.state.get(self.flat)
        return int(adamw_state["step"]) if adamw_state else 0

    def step(self, flat_grad: torch.Tensor) -> list[torch.Tensor]:
        """Applies one update with the flat gradients; returns fresh leaf tensors for the next forward."""
        if flat_grad.numel() != self.flat.numel():
            raise InvalidRequest(f"cloud optimizer: {flat_grad.numel()} gradients for {self.flat.numel()} parameters")
        self.flat.grad = flat_grad.reshape(-1).contiguous()
        self.opt.step()
        self.flat.grad = None
        return self.tensors()

    def tensors(self) -> list[torch.Tensor]:
        """Copies of the current values, as leaves that require grad (the graph never holds the optimizer's own)."""
        out, at = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(self.flat.detach()[at : at + n].view(shape).clone().requires_grad_(True))
            at += n
        return out

    def state(self) -> dict:
        """Flat float32 vectors: lora, exp_avg, exp_avg_sq (the moments empty before the first step), and steps."""
        adamw_state = self.opt.state.get(self.flat)
        empty = torch.zeros(0)
        return {
            "lora": self.flat.detach().clone(),
            "exp_avg": adamw_state["exp_avg"].clone() if adamw_state else empty,
            "exp_avg_sq": adamw_state["exp_avg_sq"].clone() if adamw_state else empty,
            "steps": self.steps,
        }

    def load(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: int) -> None:
        """Restores AdamW's moments and step count (the parameters were set at construction)."""
        n = self.flat.numel()
        if steps < 0:
            raise InvalidRequest(f"cloud optimizer: optimizer_steps must be >= 0, got {steps}")
        if steps == 0:
            return
        if exp_avg.numel() != n or exp_avg_sq.numel() != n:
            raise InvalidRequest(
                f"cloud optimizer: moments of {exp_avg.numel()} and {exp_avg_sq.numel()} values for {n} parameters"
            )
        if bool((exp_avg_sq < 0).any()):
            raise InvalidRequest("cloud optimizer: exp_avg_sq must be non-negative")
        self.opt.state[self.flat] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": exp_avg.reshape(-1).clone(),
            "exp_avg_sq": exp_avg_sq.reshape(-1).clone(),
        }
