"""The recompute mode of forward state: a pending step keeps the middle's input, and its backward reruns the forward.

Keep mode holds a training step's whole autograd graph until its Backward arrives (405 MiB for a 4x128
SmolLM2 step). Recompute mode holds what it takes to run the same forward again: the middle's input and
mask, each session's dropout seed and references to the LoRA tensors the forward used (a remote LoRA
is never changed in place: a new version, or a cloud optimizer's update, makes new tensors). Backward
reruns the forward under autograd and backpropagates through it. The rerun is the same computation on
the same values, so its output, and the gradients, are bit for bit keep mode's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.stages.lora import Binding, MultiBinding, Segment, bind

from .admission import recompute_bytes


def dropout_generator(seed: int, dropout: float, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator a training forward draws its LoRA dropout masks from (None without dropout)."""
    return torch.Generator(device=device).manual_seed(int(seed)) if dropout > 0 else None


@dataclass(eq=False)
class Replay:
    """What reruns one training forward (one session's, or a batched group's).

    Attributes:
        hidden: The middle's input (B, T, H), as the middle took it; never a graph leaf.
        mask: Its padding mask (B, T).
        segments: Each member's rows and adapter, the LoRA tensors by reference, without generators (see seeds).
        seeds: Each segment's dropout generator as (device, seed), or None without dropout.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    segments: list[Segment]
    seeds: list[tuple[torch.device, int] | None]

    @classmethod
    def of(cls, hidden: torch.Tensor, mask: torch.Tensor, segments: list[Segment]) -> Replay:
        """Before the forward runs: its input and each segment's dropout seed (fresh generators, not yet drawn from)."""
        seeds = [
            (s.generator.device, s.generator.initial_seed()) if s.generator is not None else None for s in segments
        ]
        kept = [Segment(s.size, s.tensors, s.scaling, s.dropout, None) for s in segments]  # seeds, not generators
        return cls(hidden.detach(), mask, kept, seeds)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the forward's output (the middle keeps (B, T, H))."""
        return tuple(self.hidden.shape)

    def nbytes(self, rows: int | None = None) -> int:
        """Bytes held for backward: all of it, or the share of `rows` of the batch (one member's)."""
        b, t, h = self.hidden.shape
        return recompute_bytes(b if rows is None else rows, t, h, self.hidden.element_size())

    def binding(self) -> Binding | MultiBinding:
        """The adapters of the first run, with fresh dropout generators drawing the same masks again."""
        segments = [
            Segment(s.size, s.tensors, s.scaling, s.dropout, _generator(seed))
            for s, seed in zip(self.segments, self.seeds)
        ]
        if len(segments) == 1:  # as the first run: one session alone takes the plain path
            only = segments[0]
            return Binding(only.tensors, only.scaling, only.dropout, only.generator)
        return MultiBinding(segments)

    def rerun(self, middle) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward again, under autograd: (the input leaf, the output)."""
        h_in = self.hidden.detach().requires_grad_(True)
        with torch.enable_grad(), bind(self.binding()):
            out = middle(h_in, self.mask.to(torch.long))
        return h_in, out


def _generator(seed: tuple[torch.device, int] | None) -> torch.Generator | None:
    if seed is None:
        return None
    device, value = seed
    return torch.Generator(device=device).manual_seed(value)
