"""Choosing next tokens: prompts left-padded into one batch, greedy or seeded sampling (server and private decoding)."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts left-padded into one batch: (token ids (B, T), attention mask (B, T))."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row (n,) drawn from softmax(logits / temperature) (n, V) with `generator`.

    Drawn on the CPU (where the generator lives), so a GPU computes the same draws as a CPU.
    """
    # Shifted so the largest logit is 0 and divided in float64: a tiny temperature then tends to greedy instead of
    # overflowing to inf - inf = NaN (which failed every request in the batch).
    shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)
    probs = torch.softmax(shifted / temperature, dim=-1)  # (n, V)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
