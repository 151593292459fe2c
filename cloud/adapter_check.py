"""Checks an uploaded adapter against the served model: its files, config, LoRA tensors and retuned client blocks."""

from __future__ import annotations

import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from tandem.kernels.checks import all_finite
from tandem.stages.adapter_files import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, CLIENT_BLOCKS, REQUIRED, sha256
from tandem.stages.errors import LayoutError
from tandem.stages.lora import LoRASlot, block_of
from tandem.stages.modules import StageLayout

from .adapter_config import ConfigError, LoraSettings, parse_config
from .errors import AdapterRejected

LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")  # peft's saved key of one LoRA half


def in_block(path: str) -> bool:
    """Whether module `path` lies inside one of the model's blocks."""
    try:
        block_of(path)
    except LayoutError:
        return False
    return True


def adaptable_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path (without LoRA-slot wrappers) -> (in, out) for every Linear / GPT-2 Conv1D of the model."""
    out = {}
    for path, module in model.named_modules():
        if ".base_layer" in path or path.endswith("base_layer"):
            continue
        if isinstance(module, LoRASlot):
            out[path] = (module.in_features, module.out_features)
        elif isinstance(module, nn.Linear):
            out[path] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D":
            out[path] = (module.weight.shape[0], module.weight.shape[1])
    return out


def received_files(files: dict[str, tuple[bytes, str]]) -> dict[str, bytes]:
    """The uploaded files' contents, once their names are an adapter's and their SHA-256s match what the client sent.

    Raises:
        AdapterRejected: an unknown or missing file, or a corrupt upload.
    """
    unknown = sorted(set(files) - set(ADAPTER_FILES))
    if unknown:
        raise AdapterRejected(
            f"unexpected files {unknown}; an adapter is {list(ADAPTER_FILES)} (the last one optional)"
        )
    missing = [n for n in REQUIRED if n not in files]
    if missing:
        raise AdapterRejected(f"the adapter lacks {missing}; push the adapter/ directory of a `client tune` run")
    for name, (data, digest) in files.items():
        if sha256(data) != digest:
            raise AdapterRejected(
                f"{name} arrived with SHA-256 {sha256(data)[:12]}, the client sent {digest[:12]}: "
                "the upload is corrupt; push again"
            )
    return {name: data for name, (data, _) in files.items()}


def load_tensors(name: str, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `name`; AdapterRejected when it is not one."""
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterRejected(f"{name} is not a readable safetensors file ({e})") from None


def check_finite(key: str, tensor: torch.Tensor) -> None:
    """AdapterRejected when floating-point `tensor` holds a NaN or Inf."""
    if tensor.is_floating_point() and not all_finite(tensor):
        raise AdapterRejected(f"{key!r} contains NaN or Inf; the tuning run diverged")


class AdapterCheck:
    """What an adapter must match in the served model, and the check of an uploaded one.

    Args:
        model: The served full model (its LoRA slots, if any, are looked through).
        model_id: The served model's id; adapters must name it as their base model.
        layout: The split layout the data owners tune (the emulator package's when there is one).
    """

    def __init__(self, model: nn.Module, model_id: str, layout: StageLayout):
        self.model_id = model_id
        self.layout = layout
        self.modules = adaptable_modules(model)
        self.leaves = {p.rsplit(".", 1)[-1] for p in self.modules if in_block(p)}
        self.fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
        self.state_shapes = {
            re.sub(r"\.base_layer\.", ".", k): (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()
        }

    def validate(self, blobs: dict[str, bytes]) -> tuple[int, list[int]]:
        """Checks an adapter against the served model; returns (trainable values, blocks it changes).

        Raises:
            AdapterRejected: with a message naming the first problem found.
        """
        try:
            lora = parse_config(
                blobs[ADAPTER_CONFIG], self.model_id, self.leaves, self.fan_in_fan_out, self.layout.num_layers
            )
        except ConfigError as e:
            raise AdapterRejected(f"{ADAPTER_CONFIG}: {e}") from None
        tensors = load_tensors(ADAPTER_WEIGHTS, blobs[ADAPTER_WEIGHTS])
        if not tensors:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS} holds no tensors; push the adapter/ directory of a `client tune` run"
            )
        params, blocks, halves = 0, set(), {}
        for key, tensor in tensors.items():
            path, half, block = self._check_lora(key, tensor, lora)
            halves.setdefault(path, set()).add(half)
            check_finite(key, tensor)
            params += tensor.numel()
            blocks.add(block)
        unpaired = sorted(p for p, h in halves.items() if h != {"A", "B"})
        if unpaired:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS}: {unpaired[0]!r} has only lora_{min(halves[unpaired[0]])}; "
                "every adapted layer needs both lora_A and lora_B"
            )
        if CLIENT_BLOCKS in blobs:
            block_params, tuned_blocks = self._check_client_blocks(blobs[CLIENT_BLOCKS])
            params += block_params
            blocks |= tuned_blocks
        return params, sorted(blocks)

    def _check_lora(self, key: str, tensor: torch.Tensor, lora: LoraSettings) -> tuple[str, str, int]:
        """Checks one LoRA tensor; returns (module path, "A" or "B", its block)."""
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS}: unexpected tensor {key!r}; expected base_model.model.<module>.lora_A/B.weight"
            )
        path, half = match.groups()
        if path not in self.modules:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS}: {key!r} adapts {path!r}, which the served model {self.model_id!r} "
                "does not have; was it tuned for another architecture?"
            )
        fan_in, fan_out = self.modules[path]
        if lora.rank > min(fan_in, fan_out):  # no more expressive than that, and it would pad every shared batch
            raise AdapterRejected(
                f"{ADAPTER_CONFIG}: r={lora.rank} is over {path!r}'s smaller side ({min(fan_in, fan_out)}); a larger "
                "rank adds nothing: tune with --lora-rank at most that"
            )
        want = (lora.rank, fan_in) if half == "A" else (fan_out, lora.rank)
        if tuple(tensor.shape) != want:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS}: {key!r} has shape {list(tensor.shape)}, the served model needs "
                f"{list(want)} (r={lora.rank}); was it tuned for another model size?"
            )
        try:
            block = block_of(path)
        except LayoutError:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS}: {key!r} adapts {path!r}, which is outside the blocks; "
                "tandem adapters put LoRA only on layers inside the blocks (not lm_head or embeddings)"
            ) from None
        # peft would skip a tensor its config does not target; serving would apply it: refuse the mismatch.
        if path.rsplit(".", 1)[-1] not in lora.targets or (lora.layers is not None and block not in lora.layers):
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS}: {key!r} adapts {path!r}, which {ADAPTER_CONFIG} does not "
                "target (target_modules / layers_to_transform); the two files do not belong together"
            )
        if not tensor.is_floating_point():
            raise AdapterRejected(f"{ADAPTER_WEIGHTS}: {key!r} is {tensor.dtype}; LoRA weights are floating point")
        return path, half, block

    def _check_client_blocks(self, data: bytes) -> tuple[int, set[int]]:
        """Checks retuned client-block weights; returns (their values, the blocks they change)."""
        client = set(self.layout.client_blocks)
        params, blocks = 0, set()
        for key, tensor in load_tensors(CLIENT_BLOCKS, data).items():
            want = self.state_shapes.get(key)
            if want is None:
                raise AdapterRejected(f"{CLIENT_BLOCKS}: {key!r} is not a weight of {self.model_id!r}")
            try:
                block = block_of(key)
            except LayoutError:
                block = -1  # embeddings, final norm, head: not a client block
            if block not in client:
                raise AdapterRejected(
                    f"{CLIENT_BLOCKS}: {key!r} changes block {block}, but the layout "
                    f"{self.layout.bottom}:{self.layout.top} lets the data owner tune only blocks {sorted(client)}"
                )
            if (tuple(tensor.shape), tensor.dtype) != want:
                raise AdapterRejected(
                    f"{CLIENT_BLOCKS}: {key!r} is {tensor.dtype} {list(tensor.shape)}, "
                    f"the model has {want[1]} {list(want[0])}"
                )
            check_finite(key, tensor)
            params += tensor.numel()
            blocks.add(block)
        return params, blocks
