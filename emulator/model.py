"""The emulator as a stage: a short stack of distilled blocks standing in for the model's middle."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tandem.stages.arch import Arch, Parts, parts_of
from tandem.stages.modules import run_blocks

from .errors import PackageError


class EmulatorStage(nn.Module):
    """Runs the emulator blocks with the mask and position handling of the model they came from.

    Args:
        parts: Any Parts of the same model family and config (the client's own parts work): used
            for the config and the rotary embedding, never for blocks.
        blocks: The emulator's unique blocks.
        sink: The full middle's mean output at the first token, which replaces the emulator's there
            (the package's attention sink; None: the emulator's own output).
        slots: A shared emulator's slot map (tandem.emulator.share): slot i runs blocks[slots[i]], so a block
            can stand in for several adjacent middle blocks, and the same module (one set of weights) runs in
            each of its slots; None: one slot per block, in order.
    """

    def __init__(
        self,
        parts: Parts,
        blocks: nn.ModuleList,
        sink: torch.Tensor | None = None,
        slots: list[int] | None = None,
    ):
        super().__init__()
        self.parts = parts
        self.blocks = blocks
        self.sink = sink  # (H,): the full middle's first-token output (tandem.emulator.sink), or None
        if slots is not None:
            check_slot_map(slots, len(blocks))
        self.slots = None if slots is None else list(slots)

    def slot_blocks(self) -> list[nn.Module]:
        """The block of every slot, in order (a shared block appears once per slot it fills)."""
        return list(self.blocks) if self.slots is None else [self.blocks[i] for i in self.slots]

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = run_blocks(self.parts, self.slot_blocks(), h, attention_mask)  # (B, T, H)
        if self.sink is not None:
            from .sink import apply_sink

            out = apply_sink(out, attention_mask, self.sink)
        return out


def check_slot_map(slots, n_blocks: int) -> None:
    """Refuses a slot map that is not a list of block indices in range(n_blocks) using every block.

    Raises:
        PackageError: one line saying what is wrong (the map may come from a downloaded package).
    """
    if not isinstance(slots, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in slots):
        raise PackageError(f"the emulator's slot map must be a list of block indices, got {str(slots)[:80]}")
    bad = sorted({i for i in slots if not 0 <= i < n_blocks})
    if bad:
        raise PackageError(f"the emulator's slot map names blocks {bad[:5]} but the emulator has {n_blocks} blocks")
    unused = sorted(set(range(n_blocks)) - set(slots))
    if unused:
        raise PackageError(f"the emulator's slot map never uses blocks {unused[:5]}; the package is inconsistent")


def copy_blocks(parts: Parts, block_ids: list[int]) -> nn.ModuleList:
    """Independent copies of the given blocks (the student starts as the kept teacher blocks)."""
    return nn.ModuleList(copy.deepcopy(parts.blocks[i]) for i in block_ids)


def blocks_state(arch: Arch, blocks: nn.ModuleList) -> dict[str, torch.Tensor]:
    """State of emulator blocks under keys '{block_prefix}.{j}.…', j = 0..E-1 (emulator numbering)."""
    out = {}
    for j, block in enumerate(blocks):
        for k, v in block.state_dict().items():
            out[f"{arch.block_prefix}.{j}.{k.replace('.base_layer.', '.')}"] = v.detach().contiguous()
    return out


def _blocks_config(config, kept: list[int], mlp_width: int | None = None):
    cfg = copy.deepcopy(config)
    n = len(kept)
    if mlp_width is not None:  # width-pruned emulator blocks (tandem.emulator.prune)
        setattr(cfg, "n_inner" if hasattr(cfg, "n_inner") else "intermediate_size", mlp_width)
    if getattr(cfg, "num_hidden_layers", None) is not None:
        cfg.num_hidden_layers = n
    if getattr(cfg, "n_layer", None) is not None:
        cfg.n_layer = n
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    cfg.vocab_size = 8  # only the blocks are used: do not allocate a real embedding
    cfg.tie_word_embeddings = False
    return cfg


def build_blocks(
    config, kept: list[int], state: dict[str, torch.Tensor], mlp_width: int | None = None
) -> nn.ModuleList:
    """Rebuilds emulator blocks from their saved state (frozen, eval mode).

    Args:
        config: The full model's config.
        kept: Full-model indices of the kept middle blocks (for per-layer settings).
        state: Output of blocks_state.
        mlp_width: MLP neurons per block of a width-pruned emulator (None: the model's own).
    """
    from transformers import AutoModelForCausalLM

    shell = AutoModelForCausalLM.from_config(_blocks_config(config, kept, mlp_width), dtype=torch.float32)
    parts = parts_of(shell)
    prefix = parts.arch.block_prefix + "."
    local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if len(local) != len(state):
        raise PackageError("emulator weights have keys outside the blocks; the package is not a tandem emulator")
    missing, unexpected = parts.blocks.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and "masked_bias" not in k]
    if missing or unexpected:
        raise PackageError(
            f"emulator weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    blocks = parts.blocks
    blocks.eval()
    blocks.requires_grad_(False)
    return blocks
