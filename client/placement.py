"""Where the adapter sits beyond the client's blocks: `--lora-layers` words, and LoRA on an emulator's slots.

In split and local mode `--lora-layers` may list any block: the middle's carry remote LoRA. Offsite mode
uses the same full-model indices: a middle block the emulator keeps (or, for a shared emulator, any slot it
fills) carries LoRA on that slot, and the tuned adapter plugs into that block of the full model, so an
offsite adapter opens a split session (`client eval`) or serves (`client push`) unchanged. CRaSh (Zhang et
al., EMNLP 2023) trains layers at cluster positions; here the word `clusters` names each block the emulator
keeps, at its own position, and `client` the client's blocks: `--lora-layers client,clusters`.

A block that several slots of a shared emulator run is copied for each adapted slot with its weights tied
(the same Parameter objects), so a slot's LoRA changes that slot only, as it will in the full model.
"""

from __future__ import annotations

from torch import nn

from tandem.stages.lora import SlotSpec, inject_slots
from tandem.stages.lora_layers import format_layers, parse_layers, resolve_layers, split_words
from tandem.stages.modules import StageLayout

from .errors import ClientError


def resolve_placement(spec: str, mode: str, emulator: str | None) -> tuple[int, ...]:
    """--lora-layers as block indices; its words need the emulator package of --mode offsite.

    Raises:
        ClientError: one line, for words outside offsite mode or a package that cannot be read.
    """
    if not spec:
        return ()  # every block (offsite: every client block)
    _, words = split_words(spec)
    if not words:
        return parse_layers(spec)
    if mode != "offsite":
        raise ClientError(
            f"--lora-layers: {', '.join(words)} names blocks of an emulator package, so it applies to --mode offsite "
            "only; in split and local mode list the blocks (e.g. those of the package's manifest)"
        )
    if emulator is None:
        raise ClientError("--mode offsite needs --emulator PKG, and --emulator only applies to --mode offsite")
    from tandem.emulator.errors import PackageError
    from tandem.emulator.package import read_manifest

    try:
        manifest = read_manifest(emulator)  # checked here; every file is hashed once, when the run loads it
    except PackageError as e:
        raise ClientError(f"--emulator: {e}") from None
    lay = manifest["layout"]
    client = StageLayout(lay["num_layers"], lay["bottom"], lay["top"]).client_blocks
    return resolve_layers(spec, {"client": client, "clusters": manifest["kept_middle_blocks"]})


def emulator_slots(emulator, stands_for: list[int], layers: tuple[int, ...], middle: list[int], arch, targets):
    """LoRA slots on the emulator slots of the middle blocks in `layers` (none when it lists no middle block).

    Args:
        emulator: The EmulatorStage (tandem.emulator.model); its adapted slots get modules of their own.
        stands_for: The full-model block each emulator slot stands for (the package's slot_blocks).
        layers: The run's --lora-layers (resolved); empty: the client's blocks only, as Offsite-Tuning does.
        middle: The full model's middle blocks.
        arch, targets: For inject_slots.

    Raises:
        ClientError: a listed middle block has no slot in this emulator (it was dropped).
    """
    placed = [block for block in layers if block in middle]
    if not placed:
        return []
    dropped = [block for block in placed if block not in stands_for]
    if dropped:
        raise ClientError(
            f"--lora-layers: blocks {format_layers(dropped)} are not in this emulator (dropped when it was built); its "
            f"slots stand for blocks {format_layers(sorted(set(stands_for)))}; `clusters` names the blocks it keeps"
        )
    modules = nn.ModuleList(emulator.own_slot(stands_for.index(block)) for block in placed)
    return inject_slots(modules, arch, placed, targets)


def check_shapes(placed: list[SlotSpec], client: list[SlotSpec], mlp_width: int | None) -> None:
    """Refuses LoRA on an emulator layer whose shape is not the full model's (a width-pruned MLP).

    The client's blocks are full-size blocks of the same model, so they give each layer's true shape.

    Raises:
        ClientError: naming the layer and what to do.
    """
    full = {_leaf(spec.name): (spec.in_features, spec.out_features) for spec in client}
    for spec in placed:
        shape = full.get(_leaf(spec.name))
        if shape is not None and shape != (spec.in_features, spec.out_features):
            raise ClientError(
                f"--lora-layers: the emulator's {spec.name} is {spec.in_features}x{spec.out_features} (its MLP is "
                f"pruned to {mlp_width} neurons), the full model's {shape[0]}x{shape[1]}: LoRA there would not plug "
                "in; adapt only attention modules (--lora-targets) on emulator blocks"
            )


def _leaf(name: str) -> str:
    """A slot's path inside its block: 'model.layers.7.self_attn.q_proj' -> 'self_attn.q_proj'."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), -1)
    return ".".join(parts[index + 1 :])
