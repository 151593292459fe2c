"""The emulator package: client stages, tokenizer, emulator blocks and a manifest with a SHA-256 per file."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from torch import nn

from tandem.kernels.checks import all_finite
from tandem.stages.arch import num_blocks, parts_of
from tandem.stages.errors import StageError
from tandem.stages.loading import (
    LoadedModel,
    client_state,
    config_from_json,
    config_json,
    n_params,
    pack_state,
    sha256,
    tokenizer_files,
)
from tandem.stages.modules import StageLayout

from .errors import PackageError
from .model import EmulatorStage, blocks_state, build_blocks, check_slot_map, check_slot_scales, full_mlp_width

FORMAT = "tandem-emulator/1"
MANIFEST = "manifest.json"
CLIENT_FILE = "client_stages.safetensors"
EMULATOR_FILE = "emulator.safetensors"
CONFIG_FILE = "config.json"
SINK_FILE = "sink.safetensors"
MAX_LAYERS = 1 << 16  # a manifest naming more blocks than this is not a model's


def build_package(
    loaded: LoadedModel,
    layout: StageLayout,
    kept: list[int],
    emulator: nn.ModuleList,
    out_dir: str,
    distillation: dict | None = None,
    sink: tuple[torch.Tensor, dict] | None = None,
    selection: dict | None = None,
    pruning: dict | None = None,
    slots: list[int] | None = None,
    slot_blocks: list[int] | None = None,
    slot_scales: list[float] | None = None,
) -> dict:
    """Writes PKG: client stages, tokenizer, emulator blocks, config and manifest.json; returns the manifest.

    The dropped middle blocks are never written: the emulator file holds only `emulator`'s own tensors.
    sink: (vector, stats) from tandem.emulator.sink.measure_sink; the vector is written (sink.safetensors)
    only when stats["used"].
    selection: how the kept blocks were chosen ({"method": "uniform" | "blocks" | "greedy", ...}).
    pruning: the MLP width pruning of the emulator blocks (tandem.emulator.prune.prune_blocks' record), or None.
    slots, slot_blocks: a shared emulator's slot map (tandem.emulator.share): slot i runs emulator block
    slots[i] in place of full-model middle block slot_blocks[i]; None: one slot per kept block.
    slot_scales: a shared emulator's per-slot update scales (tandem.emulator.share.fit_slot_scales), or None.
    """
    parts = parts_of(loaded.model)
    if sorted(kept) != list(kept) or not set(kept) <= set(layout.middle_blocks) or len(kept) != len(emulator):
        raise PackageError(
            f"kept blocks {kept} must be increasing middle blocks {layout.middle_blocks}, one per emulator block"
        )
    if (slots is None) != (slot_blocks is None):
        raise PackageError("give both slots and slot_blocks for a shared emulator, or neither")
    client = client_state(parts, layout)
    emu = blocks_state(parts.arch, emulator)
    files = {
        CLIENT_FILE: pack_state(client),
        EMULATOR_FILE: pack_state(emu),
        CONFIG_FILE: config_json(loaded.config).encode(),
        **tokenizer_files(loaded.path),
    }
    if sink is not None and sink[1].get("used"):
        files[SINK_FILE] = pack_state({"first_token_output": sink[0]})
    model_params = sum(p.numel() for p in loaded.model.parameters())
    manifest = {
        "format": FORMAT,
        "model_id": loaded.model_id,
        "layout": {"num_layers": layout.num_layers, "bottom": layout.bottom, "top": layout.top},
        "middle_blocks": layout.middle_blocks,
        "kept_middle_blocks": list(kept),
        "dropped_middle_blocks": [i for i in layout.middle_blocks if i not in kept],
        "selection": selection or {"method": "uniform"},
        "pruning": pruning or {"mlp_width": None},
        "params": {
            "model": model_params,
            "client_stages": n_params(client),
            "emulator": n_params(emu),
            "package": n_params(client) + n_params(emu),
            "package_share_of_model": (n_params(client) + n_params(emu)) / model_params,
        },
        "bytes": {"total": sum(len(b) for b in files.values())},
        "files": {name: {"sha256": sha256(blob), "bytes": len(blob)} for name, blob in sorted(files.items())},
        "distillation": distillation or {},
        "sink": sink[1] if sink is not None else {"used": False, "measured": False},
    }
    if slots is not None:
        manifest["slots"], manifest["slot_blocks"] = list(slots), list(slot_blocks)
    if slot_scales is not None:
        manifest["slot_scales"] = [float(x) for x in slot_scales]
    if slots is not None or slot_scales is not None:
        check_slots(manifest, layout, loaded.config)
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, blob in files.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    os.makedirs(out_dir, exist_ok=True)
    for name in list(files) + [MANIFEST]:  # keep other files in out_dir (a distillation checkpoint)
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
    return manifest


@dataclass
class EmulatorPackage:
    """A verified package on disk."""

    path: str
    manifest: dict

    @property
    def layout(self) -> StageLayout:
        lay = self.manifest["layout"]
        return StageLayout(lay["num_layers"], lay["bottom"], lay["top"])

    @property
    def kept(self) -> list[int]:
        return list(self.manifest["kept_middle_blocks"])

    @property
    def mlp_width(self) -> int | None:
        """MLP neurons per emulator block when the emulator is width-pruned, else None."""
        return self.manifest.get("pruning", {}).get("mlp_width")

    @property
    def slots(self) -> list[int] | None:
        """A shared emulator's slot map: slot i runs emulator block slots[i] (None: one slot per block)."""
        slots = self.manifest.get("slots")
        return None if slots is None else list(slots)

    @property
    def slot_scales(self) -> list[float] | None:
        """A shared emulator's per-slot update scales: slot i computes h + s_i * (block(h) - h) (None: none)."""
        scales = self.manifest.get("slot_scales")
        return None if scales is None else [float(x) for x in scales]

    @property
    def slot_blocks(self) -> list[int]:
        """The full-model middle block each slot stands for (the kept blocks when the emulator shares none)."""
        return list(self.manifest.get("slot_blocks", self.kept))

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read(self, name: str) -> bytes:
        with open(self.file(name), "rb") as f:
            return f.read()

    def files(self) -> list[str]:
        """Every file of the package, manifest last."""
        return sorted(self.manifest["files"]) + [MANIFEST]

    def config(self):
        return config_from_json(self.read(CONFIG_FILE).decode())

    def client_state(self) -> dict[str, torch.Tensor]:
        return st_load(self.read(CLIENT_FILE))

    def sink(self) -> torch.Tensor | None:
        """The full middle's first-token output the emulator stands in with (None: the package has none)."""
        if SINK_FILE not in self.manifest.get("files", {}):
            return None
        state = st_load(self.read(SINK_FILE))
        sink = state.get("first_token_output")
        hidden = self.config().hidden_size
        if set(state) != {"first_token_output"} or sink.shape != (hidden,) or not sink.is_floating_point():
            raise PackageError(
                f"the package's {SINK_FILE} must hold one vector of {hidden} numbers (first_token_output)"
            )
        if not all_finite(sink):
            raise PackageError(f"the package's {SINK_FILE} holds NaN or Inf; the package is broken or hostile")
        return sink

    def emulator_blocks(self, config=None) -> nn.ModuleList:
        """The emulator's blocks, frozen."""
        return build_blocks(config or self.config(), self.kept, st_load(self.read(EMULATOR_FILE)), self.mlp_width)

    def emulator_stage(self, parts, config=None, device=None, dtype=None) -> EmulatorStage:
        """The emulator as a middle stage over `parts` (the client's), with its sink and its full shared depth.

        Args:
            parts: Parts of the same model family and config (for the config and rotary embedding).
            config: The package's config (read from it when None).
            device, dtype: Where the blocks and the sink compute (None: as loaded, float32 on the CPU).
        """
        blocks = self.emulator_blocks(config).to(device, dtype)
        sink = self.sink()
        sink = None if sink is None else sink.to(device, dtype)
        return EmulatorStage(parts, blocks, sink, slots=self.slots, scales=self.slot_scales)


def check_slots(manifest: dict, layout: StageLayout, config) -> None:
    """Refuses a manifest whose slot map does not fit its emulator blocks and middle (one-line PackageError).

    The kept blocks are checked already (check_kept when a package is opened, build_package when one is written).
    A package without "slots" passes. With it: "slots" indexes the kept blocks and uses each; "slot_blocks"
    lists as many increasing middle blocks; where the config has per-layer attention types, every slot's block
    has its slot's type (the block's attention is built for its own full-model index); "slot_scales", when
    present, holds one finite number of magnitude at most 8 per slot.
    """
    if "slot_scales" in manifest and "slots" not in manifest:
        check_slot_scales(manifest["slot_scales"], None)
    if "slots" not in manifest and "slot_blocks" not in manifest:
        return
    kept, slots, slot_blocks = manifest["kept_middle_blocks"], manifest.get("slots"), manifest.get("slot_blocks")
    check_slot_map(slots, len(kept))
    if not isinstance(slot_blocks, list) or len(slot_blocks) != len(slots):
        raise PackageError(
            f"the manifest's slot_blocks must list one middle block per slot ({len(slots)}), got {str(slot_blocks)[:80]}"
        )
    middle = layout.middle_blocks
    if (
        not all(_whole(i) and middle[0] <= i <= middle[-1] for i in slot_blocks)
        or sorted(set(slot_blocks)) != slot_blocks
    ):
        raise PackageError(
            f"the manifest's slot_blocks {str(slot_blocks)[:80]} must be increasing middle blocks "
            f"{middle[0]}..{middle[-1]}"
        )
    own = {kept[i] for b, i in zip(slot_blocks, slots) if b == kept[i]}  # kept blocks that run in their own slot
    strays = [b for b in kept if b not in own]
    if strays:
        raise PackageError(
            f"the manifest keeps blocks {strays[:5]} but runs them only in other blocks' slots; a kept block runs in "
            "its own slot"
        )
    types = getattr(config, "layer_types", None)
    if types is not None:
        if not isinstance(types, (list, tuple)) or len(types) != layout.num_layers:
            raise PackageError(
                f"config.json's layer_types must name one attention type per block ({layout.num_layers})"
            )
        odd = [b for b, i in zip(slot_blocks, slots) if types[b] != types[kept[i]]]
        if odd:
            raise PackageError(f"the slots of middle blocks {odd[:5]} run a block of another attention type")
    if "slot_scales" in manifest:
        check_slot_scales(manifest["slot_scales"], len(slots))


def read_manifest(path: str) -> dict:
    """PKG's manifest.json, with its format, layout and kept blocks checked (no file is hashed: see load_package).

    The manifest itself carries no hash: whoever built the package chose every value in it, so the values that
    place blocks are checked here whichever way the package is opened.

    Raises:
        PackageError: one line, when the manifest is missing, unreadable, of another format or inconsistent.
    """
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise PackageError(
            f"{path!r} has no {MANIFEST}: build one with `cloud emulator build` or "
            "download one with `client fetch-emulator`"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PackageError(f"cannot read {mpath}: {type(e).__name__}: {str(e)[:120]}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PackageError(f"{mpath} is format {found!r}, this tandem reads {FORMAT!r}")
    check_kept(manifest)
    return manifest


def check_kept(manifest: dict) -> None:
    """Refuses a layout that is not whole numbers, or kept_middle_blocks that are not increasing middle blocks.

    Raises:
        PackageError: one line naming the value.
    """
    lay, files = manifest.get("layout"), manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
        raise PackageError("the manifest's files must map each file name to its sha256")
    if not isinstance(lay, dict) or not all(_whole(lay.get(k)) for k in ("num_layers", "bottom", "top")):
        raise PackageError(f"the manifest's layout must give num_layers, bottom and top as numbers: {str(lay)[:80]}")
    if not 0 < lay["num_layers"] <= MAX_LAYERS:  # before anything lists the blocks
        raise PackageError(f"the manifest's layout has {lay['num_layers']} blocks; no model has that many")
    try:
        middle = StageLayout(lay["num_layers"], lay["bottom"], lay["top"]).middle_blocks
    except (StageError, ValueError) as e:
        raise PackageError(f"the manifest's layout {str(lay)[:80]}: {e}") from None
    kept = manifest.get("kept_middle_blocks")
    ok = isinstance(kept, list) and len(kept) <= len(middle)  # before the per-entry checks: a list may be huge
    ok = ok and all(_whole(i) and middle[0] <= i <= middle[-1] for i in kept)
    if not ok or sorted(set(kept)) != kept:
        raise PackageError(
            f"the manifest's kept_middle_blocks must be increasing middle blocks {middle[:1]}..{middle[-1:]}, got "
            f"{str(kept)[:80]}"
        )


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_package(path: str) -> EmulatorPackage:
    """Opens PKG and verifies the SHA-256 of every file against manifest.json.

    Raises:
        PackageError: a file is missing, altered, or the manifest is not a tandem emulator manifest.
    """
    manifest = read_manifest(path)
    for name, meta in manifest["files"].items():
        fpath = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(fpath):
            raise PackageError(f"package file {name!r} is missing from {path!r}; download or copy the package again")
        with open(fpath, "rb") as f:
            if sha256(f.read()) != meta["sha256"]:
                raise PackageError(
                    f"package file {name!r} does not match its SHA-256 in the manifest (corrupt or "
                    "altered); download or copy the package again"
                )
    pkg = EmulatorPackage(path, manifest)
    try:
        config = pkg.config()
    except StageError as e:
        raise PackageError(f"the package's {CONFIG_FILE}: {e}") from None
    if pkg.layout.num_layers != num_blocks(config):
        raise PackageError(f"manifest layout has {pkg.layout.num_layers} blocks, config.json {num_blocks(config)}")
    check_slots(manifest, pkg.layout, config)
    check_pruning(manifest, config)
    return pkg


def check_pruning(manifest: dict, config) -> None:
    """Refuses a "pruning" record whose MLP width is not a whole number in 1..the model's own width."""
    pruning = manifest.get("pruning", {})
    if not isinstance(pruning, dict):
        raise PackageError(f"the manifest's pruning must be a record, got {str(pruning)[:80]}")
    width, full = pruning.get("mlp_width"), full_mlp_width(config)
    if width is not None and not (_whole(width) and 0 < width <= full):
        raise PackageError(
            f"the manifest's pruning.mlp_width must be 1..{full} (the model's own), got {str(width)[:40]}"
        )
