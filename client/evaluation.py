"""Evaluation: the token-weighted validation loss and perplexity of a staged model."""

from __future__ import annotations

import math

import torch

from .checkpoint import surviving_restarts


def evaluate(model, data, seed: int) -> dict:
    """Token-weighted validation loss and perplexity (no dropout, no gradients)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(data.val_batches()):
            loss, k = surviving_restarts(model, lambda: model.loss(batch, -1 - i, seed, train=False))  # noqa: B023
            total += float(loss) * k
            n += k
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}
