"""Assembling the data owner's StagedModel per mode: split (a cloud session), local (all here), offsite."""

from __future__ import annotations

from torch import nn

from tandem.stages.arch import Parts, arch_for, num_blocks, parts_of
from tandem.stages.errors import LayoutError, StageError
from tandem.stages.loading import client_parts, config_from_json, load_model, unpack_state
from tandem.stages.lora import LoRAAdapter, LoraConfig, SlotSpec, inject_slots
from tandem.stages.lora_layers import check_layers, format_layers, select_slots, selected
from tandem.stages.modules import BottomStage, MiddleStage, StageLayout, TopStage
from tandem.stages.precision import resolve

from .allowed_files import STAGES_FILE, TOKENIZER_NAMES, check_no_remote_code
from .downloads import fetch_client_files, load_tokenizer
from .errors import ClientError
from .model import LocalMiddle, StagedModel, seeded_generator
from .placement import check_shapes, emulator_slots
from .remote import RemoteMiddle
from .session import Session, close_refused_session, open_session
from .transport import Transport


def order_slots(specs: list[SlotSpec]) -> list[SlotSpec]:
    """The slots in block order; stable, so module order inside a block is kept."""
    return sorted(specs, key=lambda spec: spec.block)


def split_names(specs: list[SlotSpec], layout: StageLayout) -> tuple[list[str], list[str], list[str]]:
    """The slots' names per stage: bottom, middle, top."""
    bottom = [spec.name for spec in specs if spec.block in layout.bottom_blocks]
    middle = [spec.name for spec in specs if spec.block in layout.middle_blocks]
    top = [spec.name for spec in specs if spec.block in layout.top_blocks]
    return bottom, middle, top


def chosen_slots(specs: list[SlotSpec], layout: StageLayout, layers: tuple[int, ...]) -> list[SlotSpec]:
    """The slots of the --lora-layers blocks; refuses blocks out of the model or that carry no slot here."""
    try:
        check_layers(layers, layout.num_layers)
    except LayoutError as e:
        raise ClientError(f"--lora-layers: {e}") from None
    bare = sorted(set(layers) - {spec.block for spec in specs})
    if bare:
        raise ClientError(
            f"--lora-layers: blocks {format_layers(bare)} carry no LoRA slot in this run (the client runs blocks "
            f"{format_layers(layout.client_blocks)}; the middle's carry LoRA in split or local mode with a "
            "middle LoRA, and in offsite mode where the emulator keeps them); list only blocks that can carry LoRA"
        )
    return select_slots(specs, layers)


def _selected_block(spec: SlotSpec, layers: tuple[int, ...]) -> bool:
    """Whether a slot the server named lies in a --lora-layers block (a name without a block does not)."""
    try:
        return selected(layers, spec.block)
    except LayoutError:
        return False


def check_tokenizer(tokenizer, config) -> None:
    """Refuses a tokenizer with more tokens than the model's embedding has rows."""
    vocab = int(config.vocab_size)
    if len(tokenizer) > vocab:
        raise ClientError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
            "tokenizer and model do not belong together"
        )


def _adapter(
    specs: list[SlotSpec], layout: StageLayout, lora: LoraConfig, seed: int, device
) -> tuple[LoRAAdapter, tuple[list[str], list[str], list[str]]]:
    """The data owner's adapter over `specs` (seeded on the CPU, then moved to `device`; float32 on every device:
    the master weights) and its slot names per stage; with `lora.layers`, only those blocks' slots."""
    specs = order_slots(chosen_slots(specs, layout, lora.layers))
    return LoRAAdapter(specs, lora, generator=seeded_generator(seed)).to(device), split_names(specs, layout)


def _client_stages(parts: Parts, layout: StageLayout) -> tuple[BottomStage, TopStage]:
    """Bottom and top stages over the client's parts (its blocks renumbered 0..bottom+top-1)."""
    k = layout.bottom
    return BottomStage(parts, list(range(k))), TopStage(parts, list(range(k, k + layout.top)))


def downloaded_parts(transport: Transport, info, device: str, dtype: str):
    """The model the session announced: (config, layout, client parts, tokenizer, placement), downloaded or cached;
    the parts compute in the placement, whose `auto` dtype reads the cloud's config (its compute dtype) on a GPU.

    A refused configuration or download closes the session: it must not hold one of the identity's sessions.
    """
    try:
        config = config_from_json(info.model_config_json)
    except StageError as e:
        close_refused_session(transport, info.session_id)
        raise ClientError(f"the server's model configuration is not usable: {e}") from None
    layout = StageLayout(info.layout.num_layers, info.layout.bottom, info.layout.top)
    try:
        files = fetch_client_files(
            transport, info.session_id, info.client_stages_sha256, info.client_stages_bytes, info.client_files_sha256
        )
    except ClientError:
        close_refused_session(transport, info.session_id)
        raise
    placement = resolve(device, dtype, config)
    stages = files.pop(STAGES_FILE)  # the parts' tensors view these verified bytes (or copies of them in `placement`)
    try:
        parts = client_parts(config, layout, unpack_state(stages), placement)
    except StageError as e:
        close_refused_session(transport, info.session_id)
        raise ClientError(f"the server's client stages do not load: {e}") from None
    del stages  # held only by the tensors viewing them, if any
    tokenizer = load_tokenizer(files)
    check_tokenizer(tokenizer, config)
    return config, layout, parts, tokenizer, placement


def _opener(first: Session, open_one):
    """The remote middle's session opener: `first` once, then new sessions that must serve the same model."""
    pending, info = [first], first.info

    def opener() -> Session:
        if pending:
            return pending.pop()
        session = open_one()
        same = session.info.client_stages_sha256 == info.client_stages_sha256 and [
            slot.name for slot in session.info.middle_slots
        ] == [slot.name for slot in info.middle_slots]
        if not same:
            raise ClientError(
                "the server came back with a different model or layout; this run cannot continue against it"
            )
        return session

    return opener


def connect_split(
    transport: Transport,
    lora: LoraConfig,
    seed: int,
    remote_lora: bool = True,
    model_id: str = "",
    cloud_optimizer: dict | None = None,
    device: str = "auto",
    dtype: str = "auto",
    kill_revive: bool = False,
) -> StagedModel:
    """Opens a session, fetches the client's stages and builds the split model (see open_session); the client's
    stages compute on `device` in `dtype` (stages/precision.py), whatever the cloud computes in."""

    def open_one() -> Session:
        return open_session(transport, lora, remote_lora, model_id, cloud_optimizer, kill_revive=kill_revive)

    first = open_one()
    info = first.info
    config, layout, parts, tokenizer, placement = downloaded_parts(transport, info, device, dtype)
    targets = lora.target_modules or arch_for(config).lora_targets
    specs = inject_slots(parts.blocks, parts.arch, layout.client_blocks, targets)
    remote = [SlotSpec(slot.name, slot.in_features, slot.out_features) for slot in info.middle_slots]
    if not all(_selected_block(slot, lora.layers) for slot in remote):
        close_refused_session(transport, info.session_id)
        raise ClientError("the server made remote LoRA slots outside --lora-layers; this run cannot use it")
    specs += remote
    adapter, names = _adapter(specs, layout, lora, seed, placement.device)
    params = adapter.params_for(names[1])
    middle = RemoteMiddle(transport, _opener(first, open_one), params, cloud_optimizer=cloud_optimizer is not None)
    bottom, top = _client_stages(parts, layout)
    return StagedModel(
        bottom,
        middle,
        top,
        adapter,
        names,
        layout,
        info.model_id,
        config,
        tokenizer,
        "split",
        stages_sha256=info.client_stages_sha256,
        placement=placement,
    )


def build_local(
    model_path: str | None,
    client_blocks: str,
    lora: LoraConfig,
    seed: int,
    middle_lora: bool = True,
    device: str = "auto",
    dtype: str = "auto",
) -> StagedModel:
    """The whole model in this process with the same stages and adapter (for exactness checks), on `device` in
    `dtype`. With middle_lora=False only the client's blocks get LoRA slots (split mode's remote_lora=False).
    """
    from tandem.stages.loading import default_model_dir
    from tandem.stages.loading import load_tokenizer as load_tokenizer_dir

    loaded = load_model(model_path, device, dtype)
    parts: Parts = parts_of(loaded.model)
    layout = StageLayout.parse(client_blocks, loaded.config)
    targets = lora.target_modules or parts.arch.lora_targets
    ids = list(range(num_blocks(loaded.config))) if middle_lora else layout.client_blocks
    adapter, names = _adapter(
        inject_slots(nn.ModuleList(parts.blocks[i] for i in ids), parts.arch, ids, targets),
        layout,
        lora,
        seed,
        loaded.placement.device,
    )
    tokenizer = load_tokenizer_dir(model_path or default_model_dir())  # the loader of every mode (split's ids)
    check_tokenizer(tokenizer, loaded.config)
    middle = LocalMiddle(MiddleStage(parts, layout.middle_blocks), adapter, names[1])
    return StagedModel(
        BottomStage(parts, layout.bottom_blocks),
        middle,
        TopStage(parts, layout.top_blocks),
        adapter,
        names,
        layout,
        loaded.model_id,
        loaded.config,
        tokenizer,
        "local",
        placement=loaded.placement,
    )


def build_offsite(pkg_dir: str, lora: LoraConfig, seed: int, device: str = "auto", dtype: str = "auto") -> StagedModel:
    """The data owner's model in offsite mode: client stages from the package, the emulator as the middle.

    The client's blocks carry LoRA slots, and so do the emulator slots of middle blocks `lora.layers` lists
    (tandem.client.placement); the emulator's weights stay frozen, so the adapter plugs into the full model
    unchanged. No server is contacted.
    """
    from tandem.emulator.errors import EmulatorError

    try:  # every check of the package (built by the cloud: untrusted) is an EmulatorError
        return _offsite_model(pkg_dir, lora, seed, device, dtype)
    except EmulatorError as e:
        raise ClientError(f"--emulator: {e}") from None


def _check_tokenizer_files(package) -> None:
    """The tokenizer loads only from files the package's manifest hashes, and none of them names code."""
    import os

    listed = set(package.manifest["files"])
    unlisted = sorted(n for n in os.listdir(package.path) if n in TOKENIZER_NAMES and n not in listed)
    if unlisted:
        raise ClientError(f"--emulator: {package.path} holds {unlisted[0]}, which its manifest does not list")
    for name in sorted(listed):
        check_no_remote_code(name, package.read(name))


def _offsite_model(pkg_dir: str, lora: LoraConfig, seed: int, device: str, dtype: str) -> StagedModel:
    from tandem.emulator.package import load_package
    from tandem.stages.loading import load_tokenizer as load_tokenizer_dir

    package = load_package(pkg_dir)
    _check_tokenizer_files(package)
    config = package.config()
    layout = package.layout
    placement = resolve(device, dtype, config)
    parts = client_parts(config, layout, package.client_state(), placement)
    tokenizer = load_tokenizer_dir(package.path)  # the loader of every mode
    check_tokenizer(tokenizer, config)
    targets = lora.target_modules or parts.arch.lora_targets
    slots = inject_slots(parts.blocks, parts.arch, layout.client_blocks, targets)
    emulator = package.emulator_stage(parts, config, placement.device, placement.dtype)  # with its shared depth
    placed = emulator_slots(emulator, package.slot_blocks, lora.layers, layout.middle_blocks, parts.arch, targets)
    check_shapes(placed, slots, package.mlp_width)
    adapter, names = _adapter(slots + placed, layout, lora, seed, placement.device)
    bottom, top = _client_stages(parts, layout)
    return StagedModel(
        bottom,
        LocalMiddle(emulator, adapter, names[1]),
        top,
        adapter,
        names,
        layout,
        package.manifest["model_id"],
        config,
        tokenizer,
        "offsite",
        placement=placement,
    )
