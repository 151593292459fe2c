"""Width pruning: emulator blocks with fewer MLP neurons, so the emulator can keep more of the middle's depth.

Offsite-Tuning's emulator drops whole blocks. For a deep, narrow model the data owner's bottom adapter learns
through the emulator's response to a change of its input, and ten distilled blocks do not reproduce that of
twenty-six (bench/README.md, sixth session). Pruning MLP neurons instead keeps every kept block's attention
exactly and spends the parameter budget on depth.

Each kept block keeps the `width` MLP neurons that carry the most of its output on public text: neuron i's
score is the RMS of its activation (the input of the MLP's output projection) times the norm of its column
of that projection, i.e. the RMS size of what it adds to the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D, prune_linear_layer

from tandem.stages.arch import Parts
from tandem.stages.modules import BottomStage, StageLayout, run_blocks

from .errors import SelectionError


def mlp_layers(block: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(input projections, output projection) of a block's MLP.

    Llama-family blocks (Llama, SmolLM2, Qwen2, Mistral): ([gate_proj, up_proj], down_proj);
    GPT-2 blocks: ([c_fc], c_proj).
    """
    mlp = getattr(block, "mlp", None)
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj
    if all(isinstance(getattr(mlp, n, None), Conv1D) for n in ("c_fc", "c_proj")):
        return [mlp.c_fc], mlp.c_proj
    raise SelectionError(
        f"cannot find the MLP of a {type(block).__name__}; --mlp-width supports Llama-family and GPT-2 blocks"
    )


def mlp_width_of(block: nn.Module) -> int:
    """Number of MLP neurons of a block."""
    _, out = mlp_layers(block)
    return out.weight.shape[1] if isinstance(out, nn.Linear) else out.weight.shape[0]


def _out_columns(out: nn.Module) -> torch.Tensor:
    """Norm of each neuron's column of the output projection, (I,)."""
    w = out.weight  # Linear: (H, I); Conv1D: (I, H)
    return w.norm(dim=0) if isinstance(out, nn.Linear) else w.norm(dim=1)


@torch.no_grad()
def neuron_scores(
    parts: Parts, layout: StageLayout, kept: list[int], ids: torch.Tensor, batch_size: int = 4
) -> dict[int, torch.Tensor]:
    """Importance of every MLP neuron of the kept blocks, measured in the full model on ids (S, T).

    Returns:
        Block index -> (I,) scores: RMS activation times output-column norm.
    """
    sq = {i: torch.zeros(mlp_width_of(parts.blocks[i]), dtype=torch.float64) for i in kept}
    hooks = []
    for i in kept:

        def record(_mod, args, i=i):
            x = args[0].detach().to(torch.float64)  # (B, T, I)
            sq[i].add_(x.pow(2).sum(dim=(0, 1)))

        hooks.append(mlp_layers(parts.blocks[i])[1].register_forward_pre_hook(record))
    bottom = BottomStage(parts, layout.bottom_blocks)
    middle = [parts.blocks[i] for i in layout.middle_blocks]
    try:
        for s in range(0, len(ids), batch_size):
            x = ids[s : s + batch_size]
            am = torch.ones_like(x)
            run_blocks(parts, middle, bottom(x, am), am)
    finally:
        for h in hooks:
            h.remove()
    n = ids.numel()
    return {i: (sq[i] / n).sqrt().float() * _out_columns(mlp_layers(parts.blocks[i])[1]).float() for i in kept}


def _prune_conv1d(layer: Conv1D, index: torch.Tensor, dim: int) -> Conv1D:
    """A GPT-2 Conv1D keeping `index` along dim of its (in, out) weight: dim=1 outputs, dim=0 inputs."""
    w = layer.weight.index_select(dim, index).clone()
    b = layer.bias.clone() if dim == 0 else layer.bias[index].clone()
    new = Conv1D(w.shape[1], w.shape[0]).to(w.device, w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    return new


@torch.no_grad()
def prune_mlp(block: nn.Module, keep: torch.Tensor) -> None:
    """Keeps only the MLP neurons `keep` (increasing indices) of block, in place."""
    ins, out = mlp_layers(block)
    mlp = block.mlp
    if isinstance(out, nn.Linear):
        for name, layer in (("gate_proj", ins[0]), ("up_proj", ins[1])):
            setattr(mlp, name, prune_linear_layer(layer, keep, dim=0))
        mlp.down_proj = prune_linear_layer(out, keep, dim=1)
    else:
        mlp.c_fc = _prune_conv1d(ins[0], keep, dim=1)
        mlp.c_proj = _prune_conv1d(out, keep, dim=0)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def prune_blocks(blocks: nn.ModuleList, kept: list[int], scores: dict[int, torch.Tensor], width: int) -> dict:
    """Prunes each block (a copy of full-model block kept[j]) to its `width` highest-scoring neurons, in place.

    Returns:
        What the pruning kept, for the manifest: {"mlp_width", "from_width", "kept_score_share"} where
        kept_score_share is, per block, the share of the summed neuron scores that the kept neurons carry.
    """
    full = mlp_width_of(blocks[0])
    if not 1 <= width <= full:
        raise SelectionError(f"--mlp-width {width}: the model's MLPs have {full} neurons; choose 1..{full}")
    share = []
    for block, i in zip(blocks, kept):
        s = scores[i]
        keep = torch.topk(s, width).indices.sort().values
        share.append(round(float(s[keep].sum() / s.sum()), 4))
        prune_mlp(block, keep)
    return {"mlp_width": width, "from_width": full, "kept_score_share": share}
