"""The emulator as a stage: a short stack of distilled blocks standing in for the model's middle."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from tandem.kernels.checks import all_finite
from tandem.stages.arch import Arch, Parts, arch_for, parts_of
from tandem.stages.modules import run_blocks

from .errors import PackageError

MAX_SLOT_SCALE = 8.0  # the largest |scale| a package may give a slot's update


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
        scales: A shared emulator's per-slot update scales (tandem.emulator.share.fit_slot_scales): slot i computes
            h + scales[i] * (block(h) - h); None (or a scale of exactly 1.0): the block's plain output.
    """

    def __init__(
        self,
        parts: Parts,
        blocks: nn.ModuleList,
        sink: torch.Tensor | None = None,
        slots: list[int] | None = None,
        scales: list[float] | None = None,
    ):
        super().__init__()
        self.parts = parts
        self.blocks = blocks
        self.sink = sink  # (H,): the full middle's first-token output (tandem.emulator.sink), or None
        if slots is not None:
            check_slot_map(slots, len(blocks))
        self.slots = None if slots is None else list(slots)
        if scales is not None and (slots is None or len(scales) != len(slots)):
            raise PackageError("the emulator's slot scales need a slot map of as many slots")
        self.scales = None if scales is None else [float(x) for x in scales]
        self.own = nn.ModuleDict()  # slot -> its own module (tied weights), for LoRA on one slot of a shared block

    def slot_blocks(self) -> list[nn.Module]:
        """The module of every slot, in order (a shared block appears once per slot it fills, unless own_slot gave
        that slot a module of its own)."""
        shared = list(self.blocks) if self.slots is None else [self.blocks[i] for i in self.slots]
        return [self.own[str(i)] if str(i) in self.own else block for i, block in enumerate(shared)]

    def own_slot(self, slot: int) -> nn.Module:
        """Slot `slot`'s module, made its own when its block fills other slots too: a copy whose parameters and
        buffers are the shared block's own tensors (no new memory, frozen weights stay one), so wrapping its layers
        (e.g. in LoRA slots) changes this slot only."""
        block = self.slot_blocks()[slot]
        if self.slots is None or self.slots.count(self.slots[slot]) == 1 or str(slot) in self.own:
            return block
        memo = {id(t): t for t in [*block.parameters(), *block.buffers()]}
        self.own[str(slot)] = copy.deepcopy(block, memo)
        return self.own[str(slot)]

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = run_blocks(self.parts, scaled_slots(self.slot_blocks(), self.scales), h, attention_mask)  # (B, T, H)
        if self.sink is not None:
            from .sink import apply_sink

            out = apply_sink(out, attention_mask, self.sink)
        return out


def scaled_slots(blocks: list[nn.Module], scales: list[float] | None) -> list:
    """The slots' blocks for run_blocks, each slot of scale a != 1.0 wrapped to compute h + a * (block(h) - h).

    A scale of exactly 1.0 keeps the block itself (bit for bit the unscaled forward); scales given as a tensor (a
    distillation that learns them) wrap every slot, so each scale gets its gradient (a slot whose learned scale is
    exactly 1.0 then differs from the shipped one by rounding, ~1e-10).
    """
    if scales is None:
        return list(blocks)
    learned = isinstance(scales, torch.Tensor)
    return [ScaledSlot(block, scale) if learned or scale != 1.0 else block for block, scale in zip(blocks, scales)]


class ScaledSlot:
    """One slot's block with its residual update scaled: h + scale * (block(h) - h) (a callable, not a module, so
    the block's parameters and hooks stay the block's own)."""

    def __init__(self, block: nn.Module, scale: float):
        self.block, self.scale = block, scale

    def __call__(self, h: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.block(h, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # (B, T, H)
        return h + self.scale * (out - h)


def check_slot_scales(scales, n_slots: int | None) -> None:
    """Refuses slot scales that are not a list of n_slots finite numbers of magnitude at most MAX_SLOT_SCALE.

    Raises:
        PackageError: one line saying what is wrong (the scales may come from a downloaded package).
    """
    if n_slots is None:
        raise PackageError("the manifest has slot_scales but no slot map; the package is inconsistent")
    ok = isinstance(scales, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) <= MAX_SLOT_SCALE and math.isfinite(x)
        for x in scales
    )
    if not ok or len(scales) != n_slots:
        raise PackageError(
            f"the manifest's slot_scales must list {n_slots} finite numbers in [-{MAX_SLOT_SCALE:g}, "
            f"{MAX_SLOT_SCALE:g}], one per slot, got {str(scales)[:80]}"
        )


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


def full_mlp_width(config) -> int:
    """The model's own MLP neurons per block (GPT-2: n_inner, or 4 x n_embd when unset)."""
    if hasattr(config, "n_inner"):
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


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

    The values come from a package the cloud built, so nothing is allocated from them before they are checked:
    the weights must name exactly len(kept) blocks, and the shell is built on the meta device, compared shape by
    shape with the weights, then takes the weights' own tensors.

    Args:
        config: The full model's config.
        kept: Full-model indices of the kept middle blocks (for per-layer settings).
        state: Output of blocks_state.
        mlp_width: MLP neurons per block of a width-pruned emulator (None: the model's own).
    """
    from transformers import AutoModelForCausalLM

    prefix = arch_for(config).block_prefix + "."
    local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if len(local) != len(state):
        raise PackageError("emulator weights have keys outside the blocks; the package is not a tandem emulator")
    found = {k.split(".", 1)[0] for k in local}
    if found != {str(j) for j in range(len(kept))}:
        raise PackageError(f"emulator weights hold {len(found)} block(s); the manifest keeps {len(kept)}")
    try:
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(_blocks_config(config, kept, mlp_width), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure of a config from the network is the package's fault
        raise PackageError(f"the package's config does not build its blocks ({type(e).__name__}: {e})"[:200]) from None
    blocks = parts_of(shell).blocks
    _check_fit(blocks.state_dict(), local)
    blocks.load_state_dict({k: v.to(torch.float32) for k, v in local.items()}, strict=False, assign=True)
    empty = [n for n, v in [*blocks.named_parameters(), *blocks.named_buffers()] if v.is_meta]
    if empty:
        raise PackageError(f"emulator weights do not fit the config: no weights for {empty[:3]}")
    blocks.eval()
    blocks.requires_grad_(False)
    return blocks


def _check_fit(wanted: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> None:
    """Refuses weights whose names or shapes differ from the blocks the config builds (one-line PackageError)."""
    missing = [k for k in wanted if k not in local and not k.endswith(".attn.bias") and "masked_bias" not in k]
    unexpected = [k for k in local if k not in wanted]
    if missing or unexpected:
        raise PackageError(
            f"emulator weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    wrong = [
        f"{k} {list(v.shape)} (needs {list(wanted[k].shape)})" for k, v in local.items() if v.shape != wanted[k].shape
    ]
    if wrong:
        raise PackageError(f"emulator weights do not fit the config: {', '.join(wrong[:2])}")
    if not all(all_finite(v) for v in local.values() if v.is_floating_point()):
        raise PackageError("emulator weights hold NaN or Inf; the package is broken or hostile")
