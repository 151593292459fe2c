"""The blocks that carry LoRA (peft's layers_to_transform): parsing `--lora-layers`, checking and selecting.

Both sides use this one module: the client parses the flag and picks its slots, the cloud checks the
untrusted OpenSessionRequest.lora_layers and picks its remote slots. An empty tuple means every block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import LayoutError

MAX_SPEC_CHARS = 4096  # a --lora-layers value longer than this is not a list of blocks
MAX_BLOCK = 1 << 16  # nor is one naming a block past this (a range up to it would only fill memory)
# Words a spec may hold besides indices, each standing for blocks only a layout or emulator package knows
# (resolved by the caller, e.g. tandem.client.placement): "client" the client's blocks, "clusters" each block an
# emulator keeps, at its own position (a shared emulator's cluster representatives).
WORDS = ("client", "clusters")


def parse_layers(spec: str) -> tuple[int, ...]:
    """Block indices of a spec such as "28,29", "26-29" or "0,26-29" (sorted, each once); "" means every block.

    Raises:
        ValueError: the spec is not comma-separated indices and A-B ranges, or lists a block twice.
    """
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(f"expected block indices such as 26-29 or 28,29, got {len(spec)} characters")
    blocks: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"expected block indices such as 26-29 or 28,29, got {spec!r}")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"the range {part!r} runs backwards; write {last}-{first}")
        if last >= MAX_BLOCK:
            raise ValueError(f"block {last} in {part!r}: no model has that many blocks")
        blocks += range(first, last + 1)
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{spec!r} lists a block more than once")
    return tuple(sorted(blocks))


def split_words(spec: str) -> tuple[str, tuple[str, ...]]:
    """A spec's indices and ranges (as a spec) and its words, in order: "0,clusters,28-29" -> ("0,28-29", ("clusters",)).

    Raises:
        ValueError: the indices are malformed (parse_layers) or a word appears twice.
    """
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(f"expected block indices such as 26-29 or 28,29, got {len(spec)} characters")
    if not spec:
        return "", ()  # every block
    parts = [p.strip() for p in spec.split(",")]
    words = tuple(p for p in parts if p in WORDS)
    if len(set(words)) != len(words):
        raise ValueError(f"{spec!r} lists a word more than once")
    numeric = ",".join(p for p in parts if p not in WORDS)
    if numeric or not words:
        parse_layers(numeric)  # checks the indices (words alone leave none to check)
    return numeric, words


def resolve_layers(spec: str, named: dict[str, Sequence[int]]) -> tuple[int, ...]:
    """A spec's blocks with each word replaced by the blocks `named` gives it (sorted, each once).

    Raises:
        ValueError: malformed indices, or a word `named` lacks (it names what the words need).
    """
    numeric, words = split_words(spec)
    blocks = set(parse_layers(numeric)) if numeric else set()
    for word in words:
        if word not in named:
            raise ValueError(f"{word!r} names blocks of an emulator package: it applies to --mode offsite only")
        blocks |= {int(b) for b in named[word]}
    return tuple(sorted(blocks))


def format_layers(layers: Sequence[int]) -> str:
    """The compact spec of sorted blocks ("26-29,31"); "every block" for the empty tuple."""
    if not layers:
        return "every block"
    runs: list[list[int]] = []
    for block in layers:
        if runs and block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_layers(layers: Sequence[int], num_layers: int) -> None:
    """Refuses a list of blocks that is too long, out of 0..num_layers-1, or names a block twice.

    The list may come from the network: its length is checked before anything else is done with it.

    Raises:
        LayoutError: naming what is wrong.
    """
    if len(layers) > num_layers:
        raise LayoutError(f"lora_layers lists {len(layers)} blocks; the model has {num_layers}")
    outside = sorted({int(i) for i in layers if not 0 <= int(i) < num_layers})
    if outside:
        raise LayoutError(f"lora_layers {outside[:8]} are not blocks of the model (0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise LayoutError("lora_layers lists a block more than once")


def selected(layers: Sequence[int], block: int) -> bool:
    """Whether `block` carries LoRA under `layers` (empty: every block does)."""
    return not layers or block in layers


def select_slots(specs: Iterable, layers: Sequence[int]) -> list:
    """The slot specs (anything with a `.block`) of the selected blocks, in their order."""
    return [spec for spec in specs if selected(layers, spec.block)]
