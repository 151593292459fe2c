"""Label protection at the top cut: noise on the gradient the client sends down, scaled to each token's own norm.

The cloud reads labels from the top-cut gradient g = dL/dh' = J^T (softmax - onehot) / n by pushing -g
through the top blocks and head it shipped (attacks.gradient_attack): the label's logit rises most.
`LabelNoise` adds, to each token's gradient g_t, Gaussian noise of expected norm `scale` x |g_t| (isotropic:
N(0, (scale |g_t|)^2 / H) per coordinate), drawn from a generator seeded from a secret the cloud never
receives (not the run's --seed, which the dropout seeds sent with every Forward reveal). Only the gradient
that leaves for the middle changes: the top adapter's gradient is taken before it (exact), while the
middle's LoRA and the bottom train on the noisy one (the defense's cost). Installed as a forward-pre-hook on
the top stage, registered after the privacy tap's, so the audit records the gradient as the cloud gets it.
"""

from __future__ import annotations

import math

import torch

from .defenses import keyed_normal, new_secret

ALGORITHM = "relative-gaussian/v1"


class NoisyGradient(torch.autograd.Function):
    """Identity forward; backward adds the defense's noise to the incoming gradient."""

    @staticmethod
    def forward(ctx, h, defense, seed):
        ctx.defense, ctx.seed = defense, seed
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return ctx.defense.perturb(grad, ctx.seed), None, None


class LabelNoise:
    """The defense: see the module docstring. `scale` is --label-noise."""

    def __init__(self, scale: float, secret: bytes | None = None):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"--label-noise must be a finite number > 0, got {scale}")
        self.scale = scale
        self.secret = new_secret() if secret is None else bytes(secret)  # 256 bits, like the cut noise's key
        self.step = 0  # the training step the next forward belongs to (set by the trainer): a redone step
        # draws the same noise again, so a cloud that drops the session after a Backward cannot average draws

    def install(self, model) -> LabelNoise:
        model.top.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        h = args[0]
        if not (torch.is_grad_enabled() and h.requires_grad):
            return None  # evaluation, or nothing below the top cut trains: no gradient goes down
        return (NoisyGradient.apply(h, self, self.draw_key(self.step)), *args[1:])

    def draw_key(self, step: int) -> bytes:
        """The noise key of one training step: the secret and the step's number."""
        return self.secret + int(step).to_bytes(8, "little")

    def perturb(self, grad: torch.Tensor, key: bytes) -> torch.Tensor:
        """grad (B, T, H) plus noise of expected norm scale x each token's gradient norm."""
        z = keyed_normal(grad.shape, key).to(grad.device, grad.dtype)
        norm = grad.norm(dim=-1, keepdim=True)  # (B, T, 1)
        return grad + z * norm * (self.scale / math.sqrt(grad.shape[-1]))

    def describe(self) -> dict:
        return describe(self.scale)

    def state_dict(self) -> dict:
        return {"secret": self.secret}

    def load_state_dict(self, saved: dict) -> None:
        secret = saved["secret"]  # an int in checkpoints from before the 256-bit key
        self.secret = secret.to_bytes(8, "little") if isinstance(secret, int) else bytes(secret)


def describe(scale: float) -> dict:
    """The settings the privacy context records (never the secret)."""
    return {
        "algorithm": ALGORITHM,
        "scale": scale,
        "noise": "per token: N(0, (scale * |g_t|)^2 / H) per coordinate, added to the top-cut gradient g_t",
    }
