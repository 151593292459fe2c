"""Candidate emulator structures under a parameter budget: uniform drops, width-pruned depth, and shared clusters.

Every candidate spends (nearly) the whole budget: for a number of unique blocks it takes the widest MLP that fits.
The uniform family keeps k evenly spaced middle blocks (tandem.emulator.select); the share family clusters the
middle by the CKA of its blocks' outputs (tandem.emulator.share) into c clusters, each refilled by one block (its
first, middle or last), so the emulator keeps the full depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tandem.stages.arch import Parts
from tandem.stages.modules import StageLayout

from .errors import SelectionError
from .gradient_select import Candidate
from .prune import mlp_layers, mlp_width_of
from .select import kept_blocks

REPRESENTATIVES = ("first", "middle", "last")  # which block of a cluster fills its slots


def block_params(block: nn.Module, width: int | None = None) -> int:
    """Parameters of a block whose MLP keeps `width` neurons (None: all)."""
    total = sum(p.numel() for p in block.parameters())
    full = mlp_width_of(block)
    if width is None or width == full:
        return total
    ins, out = mlp_layers(block)
    per_neuron = sum(layer.weight.numel() + _bias(layer) for layer in ins) // full + out.weight.numel() // full
    return total - (full - width) * per_neuron


def _bias(layer: nn.Module) -> int:
    return 0 if getattr(layer, "bias", None) is None else layer.bias.numel()


def widest(block: nn.Module, count: int, room: int) -> int | None:
    """The widest MLP (a multiple of a step of about 1/48 of the full width, or the full width) with which `count`
    such blocks fit `room` parameters; None when not even 1/16 of the full width fits."""
    full = mlp_width_of(block)
    if count * block_params(block) <= room:
        return full
    step = 2 ** int(math.log2(max(1, full // 48)))
    per_neuron = block_params(block, full) - block_params(block, full - 1)
    base = block_params(block, full) - full * per_neuron
    width = (room // count - base) // max(1, per_neuron) // step * step
    return width if width >= max(1, full // 16) else None


def counts_to_try(block: nn.Module, n: int, room: int, how_many: int = 5) -> list[int]:
    """Up to `how_many` unique-block counts, evenly spaced from the most full-width blocks that fit to all n."""
    full_fit = min(n, room // block_params(block))
    low = max(1, full_fit)
    if low >= n:
        return [n]
    return sorted({round(low + i * (n - low) / (how_many - 1)) for i in range(how_many)})


def uniform_candidates(parts: Parts, layout: StageLayout, room: int, counts: list[int], width: int | None) -> list:
    """Uniform drops of k blocks for every k in counts, each at the widest MLP that fits (or at `width`)."""
    middle = layout.middle_blocks
    out = []
    for k in counts:
        w = _width(parts.blocks[middle[0]], k, room, width)
        if w is None:
            continue
        kept = kept_blocks(middle, keep=k)
        out.append(_candidate(parts, f"uniform k={k}", kept, None, None, w))
    return out


def share_candidates(
    parts: Parts,
    layout: StageLayout,
    room: int,
    counts: list[int],
    width: int | None,
    cka: torch.Tensor,
    max_cluster: int | None = None,
) -> list:
    """Shared emulators of c clusters for every c in counts (below the middle's size: c = n shares nothing), each
    cluster filled by its first, middle or last block, at the widest MLP that fits (or at `width`); no cluster
    over max_cluster blocks (None: no cap; a count the cap cannot reach is left out)."""
    from .share import cluster_blocks, slot_map

    middle = layout.middle_blocks
    types = getattr(parts.config, "layer_types", None)
    types = None if types is None else [types[i] for i in middle]
    out = []
    for c in (c for c in counts if c < len(middle)):
        w = _width(parts.blocks[middle[0]], c, room, width)
        try:
            runs = cluster_blocks(cka, c, types, max_cluster)
        except SelectionError:  # fewer clusters than runs of attention types, or more than the cap allows
            continue
        for rule in REPRESENTATIVES if w is not None else ():
            reps = [middle[run[{"first": 0, "middle": (len(run) - 1) // 2, "last": -1}[rule]]] for run in runs]
            kept, slots, slot_blocks = slot_map(middle, runs, reps)
            out.append(_candidate(parts, f"share c={c} rep={rule}", kept, slots, slot_blocks, w))
    return _distinct(out)


def structures(
    parts: Parts,
    layout: StageLayout,
    ids: torch.Tensor,
    room: int,
    count: int | None,
    width: int | None,
    families: tuple[str, ...],
    max_cluster: int | None = None,
) -> list[Candidate]:
    """The candidates of `families` ("uniform", "share") whose unique blocks fit `room` parameters.

    Args:
        ids: Public ids (S, T) the share family's CKA is measured on.
        count: Only this many unique blocks (None: counts_to_try's spread).
        width: Only this MLP width (None: the widest that fits each count).
        max_cluster: The share family's cap on a cluster's blocks (None: no cap).
    """
    if not families or set(families) - {"uniform", "share"}:
        raise SelectionError(f"candidate families must be uniform and/or share, got {families}")
    middle = layout.middle_blocks
    counts = [count] if count is not None else counts_to_try(parts.blocks[middle[0]], len(middle), room)
    out = uniform_candidates(parts, layout, room, counts, width) if "uniform" in families else []
    if "share" in families:
        from .share import middle_cka

        out += share_candidates(parts, layout, room, counts, width, middle_cka(parts, layout, ids), max_cluster)
    return out


def _width(block: nn.Module, count: int, room: int, width: int | None) -> int | None:
    """`width` when the operator fixed it and it fits, else the widest that fits."""
    if width is None:
        return widest(block, count, room)
    full = mlp_width_of(block)
    if not 1 <= width <= full:
        raise SelectionError(f"--mlp-width {width}: the model's MLPs have {full} neurons; choose 1..{full}")
    return width if count * block_params(block, width) <= room else None


def _candidate(parts: Parts, name: str, kept, slots, slot_blocks, width: int) -> Candidate:
    full = mlp_width_of(parts.blocks[kept[0]])
    mlp_width = None if width == full else width
    params = sum(block_params(parts.blocks[i], mlp_width) for i in kept)
    if mlp_width is not None:
        name += f" w={mlp_width}"
    return Candidate(name, list(kept), slots, slot_blocks, mlp_width, params)


def _distinct(cands: list[Candidate]) -> list[Candidate]:
    """The candidates with a structure not seen before (small clusters make first, middle and last coincide)."""
    seen, out = set(), []
    for c in cands:
        key = (tuple(c.kept), tuple(c.slots or ()), c.mlp_width)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
