"""Uniform layer drop: which middle blocks the emulator keeps (Offsite-Tuning's uniform_choose_layers)."""

from __future__ import annotations

from .errors import SelectionError


def uniform_keep(n: int, k: int) -> list[int]:
    """Positions 0..n-1 of k evenly spaced blocks; the first and the last are always kept.

    Uses stride (n-1)/(k-1) and round(i*stride), as the Offsite-Tuning reference does.

    Args:
        n: Number of middle blocks.
        k: How many to keep, 1 <= k <= n.
    """
    if not 1 <= k <= n:
        raise SelectionError(f"cannot keep {k} of {n} middle blocks; choose --keep between 1 and {n}")
    if k == 1:
        return [0]
    stride = (n - 1) / (k - 1)
    out = sorted({round(i * stride) for i in range(k)})
    if len(out) != k:  # cannot happen for stride >= 1, kept as a guard against rounding surprises
        raise SelectionError(f"uniform selection of {k} of {n} blocks produced duplicates")
    return out


def keep_count(n: int, drop_ratio: float | None = None, keep: int | None = None) -> int:
    """How many of n middle blocks to keep, from exactly one of --drop-ratio or --keep."""
    if (drop_ratio is None) == (keep is None):
        raise SelectionError("give exactly one of --drop-ratio F or --keep N")
    if keep is not None:
        if not 1 <= keep <= n:
            raise SelectionError(f"--keep {keep}: the model has {n} middle blocks; choose 1..{n}")
        return keep
    if not 0.0 <= drop_ratio < 1.0:
        raise SelectionError(f"--drop-ratio must be in [0, 1), got {drop_ratio}")
    return max(1, min(n, round(n * (1.0 - drop_ratio))))


def kept_blocks(
    middle: list[int], drop_ratio: float | None = None, keep: int | None = None, blocks: list[int] | None = None
) -> list[int]:
    """Full-model indices of the middle blocks the emulator keeps.

    Args:
        middle: Full-model indices of the middle blocks, in order.
        drop_ratio: Share of middle blocks to drop (0.5 keeps about half).
        keep: Number of middle blocks to keep (alternative to drop_ratio).
        blocks: Exactly these middle blocks (alternative to both: the operator's own choice, e.g. a uniform
            selection with the block that makes the attention sink swapped in).
    """
    if blocks is not None:
        if drop_ratio is not None or keep is not None:
            raise SelectionError("give one of --drop-ratio, --keep or --keep-blocks")
        out = sorted(set(blocks))
        bad = [b for b in out if b not in middle]
        if not out or bad or len(out) != len(blocks):
            raise SelectionError(
                f"--keep-blocks {blocks}: give distinct middle blocks, from {middle[0]} to {middle[-1]}"
                + (f" ({bad} are not middle blocks)" if bad else "")
            )
        return out
    k = keep_count(len(middle), drop_ratio, keep)
    return [middle[i] for i in uniform_keep(len(middle), k)]
