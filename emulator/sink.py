"""The attention sink: the full middle's output at a sequence's first token, shipped with the emulator.

Many decoders turn the first token of every sequence into an attention sink: its hidden state grows
to a huge, nearly input-independent vector that later attention heads park their attention on.
SmolLM2-135M does it between blocks 10 and 13: the middle's output at the first token has an RMS
of about 985 against about 26 for other tokens, and varies by 4% between sequences. A layer-dropped
emulator does not rebuild it (RMS about 53 after distillation, because the blocks that make it were
dropped), so the adapter's top blocks are tuned against a model without a sink and meet one when
they are plugged into the full model. Measured on SmolLM2 (bench/README.md, 160 tuning steps, side
by side): replacing the emulator's first-token output with the full middle's mean there raised the
plug-in's share of full tuning's gain from 66.8% to 71.9%.

The vector is measured on the operator's public text, like the distillation. It reveals the full
middle's output at one position, averaged, which is far less than the emulator itself reveals.
"""

from __future__ import annotations

import torch

from tandem.stages.arch import parts_of
from tandem.stages.loading import LoadedModel
from tandem.stages.modules import BottomStage, MiddleStage, StageLayout

MIN_RATIO = 5.0  # the first token's output RMS over the median of the others': below this there is no sink
MAX_SPREAD = 0.1  # the first token's outputs' mean relative distance from their mean: above this it is not constant


def measure_sink(
    loaded: LoadedModel, layout: StageLayout, blocks: torch.Tensor, batch_size: int = 8, max_blocks: int = 64
) -> tuple[torch.Tensor, dict]:
    """Runs the full model's bottom and middle on packed public text (N, T); returns (mean first-token output, stats).

    stats: rms_first, rms_other (median), ratio, spread, made_by_block (the middle block that grows the first
    token's hidden state the most, if at least MIN_RATIO-fold, else None), and `used`: whether the emulator should replace its
    first-token output with the vector (a sink exists and is nearly constant).
    """
    parts = parts_of(loaded.model)
    bottom, middle = BottomStage(parts, layout.bottom_blocks), MiddleStage(parts, layout.middle_blocks)
    firsts, other = [], []
    growth: dict[int, list[float]] = {j: [] for j in layout.middle_blocks}  # block -> first-token RMS after / before it

    def watch(j):
        def hook(_m, args, out):
            h_in, h = args[0], out[0] if isinstance(out, tuple) else out
            growth[j].append(float(h[:, 0].pow(2).mean(-1).sqrt().mean() / h_in[:, 0].pow(2).mean(-1).sqrt().mean()))

        return hook

    hooks = [parts.blocks[j].register_forward_hook(watch(j)) for j in layout.middle_blocks]
    try:
        with torch.no_grad():
            for i in range(0, min(len(blocks), max_blocks), batch_size):
                ids = blocks[i : i + batch_size]
                am = torch.ones_like(ids)
                out = middle(bottom(ids, am), am)  # (b, T, H)
                firsts.append(out[:, 0])
                other.append(out[:, 1:].pow(2).mean(-1).sqrt().reshape(-1))
    finally:
        for h in hooks:
            h.remove()
    grew = {j: sum(v) / len(v) for j, v in growth.items() if v}
    made_by = max(grew, key=grew.get) if grew and max(grew.values()) >= MIN_RATIO else None
    first = torch.cat(firsts)  # (n, H)
    mean = first.mean(0)
    rms_first = float(first.pow(2).mean(-1).sqrt().mean())
    rms_other = float(torch.cat(other).median())
    spread = float(((first - mean).norm(dim=-1) / mean.norm().clamp_min(1e-12)).mean())
    ratio = rms_first / max(rms_other, 1e-12)
    stats = {
        "rms_first": rms_first,
        "rms_other": rms_other,
        "ratio": ratio,
        "spread": spread,
        "sequences": len(first),
        "made_by_block": made_by,
        "used": ratio >= MIN_RATIO and spread <= MAX_SPREAD,
    }
    return mean.contiguous(), stats


def apply_sink(out: torch.Tensor, attention_mask: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """`out` (B, T, H) with each row's first real token (left padding aware) replaced by `sink` (H,)."""
    first = attention_mask.to(torch.long).argmax(dim=1)  # (B,): the first 1 in each row
    rows = torch.arange(out.shape[0])
    return out.index_put((rows, first), sink.to(out.dtype).expand(out.shape[0], -1))


def keep_sink_block(kept: list[int], stats: dict) -> tuple[list[int], dict | None]:
    """The kept blocks with the sink's maker in place of the nearest interior kept block, and a record of the swap.

    A layer drop that loses the block making the attention sink leaves the top blocks tuning against a middle
    without it (measured on SmolLM2: keeping block 11 instead of 10 raised the plug-in's recovery in the bench
    protocol). Nothing changes when there is no sink or its maker is already kept: (kept, None).
    """
    made = stats.get("made_by_block")
    if not stats.get("used") or made is None or made in kept or len(kept) < 3:
        return list(kept), None
    near = min(kept[1:-1], key=lambda j: abs(j - made))  # the first and last middle blocks stay
    return sorted({*kept, made} - {near}), {"kept": made, "instead_of": near}
