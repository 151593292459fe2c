"""LoRA slots in frozen blocks, adapters that fill them, and the peft file format.

A *slot* wraps one frozen target layer (q_proj, c_attn, ...) and adds whatever LoRA the
current call binds to it. Binding is per thread (a ContextVar), so one frozen backbone in
the cloud serves many sessions, each with its own adapter, and the client runs its stages
the same way. Slot names are the module paths in the *full* model
("model.layers.7.self_attn.q_proj"), so they double as peft keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tandem.kernels.lora import add_delta, dropout_, lora_delta
from tandem.kernels.multilora import multilora_delta, plan_segments, segment_ids, stack_adapters

from .arch import Arch
from .errors import LayoutError

_BOUND: contextvars.ContextVar[Binding | None] = contextvars.ContextVar("tandem_lora_binding", default=None)


@dataclass
class LoraConfig:
    """LoRA hyper-parameters chosen by the data owner.

    Attributes:
        rank: Rank r of A (r x in) and B (out x r).
        alpha: Scaling numerator; the delta is (alpha / r) * B A x.
        dropout: Dropout on the LoRA input (drawn from per-step seeded generators).
        target_modules: Module names to adapt; empty means peft's default for the architecture.
        layers: Full-model indices of the blocks that carry LoRA (peft's layers_to_transform; see
            stages/lora_layers.py); empty means every block.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.target_modules = tuple(self.target_modules)
        self.layers = tuple(int(i) for i in self.layers)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class SlotSpec:
    """One adaptable layer: its full-model path and its matrix sizes."""

    name: str
    in_features: int
    out_features: int

    @property
    def block(self) -> int:
        """Index of the block the slot lives in (full-model numbering)."""
        return block_of(self.name)


def block_of(name: str) -> int:
    """Extracts the block index from a slot name such as 'model.layers.7.self_attn.q_proj'."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise LayoutError(f"slot name {name!r} has no block index")


def _dims(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.dim() == 2 and type(layer).__name__ == "Conv1D":
        return weight.shape[0], weight.shape[1]  # GPT-2 Conv1D stores (in, out)
    raise LayoutError(f"cannot put LoRA on {type(layer).__name__}; only Linear and GPT-2 Conv1D")


@dataclass
class Binding:
    """The adapter tensors one call uses, by slot name, and the dropout generator."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    dropout: float = 0.0
    generator: torch.Generator | None = None


@dataclass
class Segment:
    """A run of batch elements that share one adapter inside a MultiBinding.

    Attributes:
        size: Batch elements (sequences) in the run.
        tensors: The run's adapter, by slot name: (A (r, in), B (out, r)); slots it lacks get no delta.
        scaling: alpha / r of the run's adapter.
        dropout: Dropout on the LoRA input, drawn from `generator` exactly as a Binding would.
        generator: The run's dropout generator (one per run, so batching does not change the masks).
    """

    size: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    dropout: float = 0.0
    generator: torch.Generator | None = None


class MultiBinding:
    """Different adapters for different sequences of one batch (coordinated batching, adapter serving).

    The batch is the concatenation of the segments along dim 0, in order. Each slot stacks the
    segments' (A, B) once and applies them with the segmented multi-LoRA kernel; the stacking is
    differentiable, so every segment's own tensors get their own gradients. Results equal running
    each segment alone under its Binding, up to float rounding.
    """

    def __init__(self, segments: list[Segment], impl: str = "auto"):
        if not segments or any(s.size < 1 for s in segments):
            raise ValueError("a MultiBinding needs segments of at least one sequence each")
        self.segments = segments
        self.impl = impl
        self.sizes = [s.size for s in segments]
        self._stacked: dict[str, tuple | None] = {}
        self._plans: dict[tuple, object] = {}

    @property
    def batch(self) -> int:
        return sum(self.sizes)

    def _stack(self, name: str, like: torch.Tensor):
        if name not in self._stacked:
            present = [i for i, s in enumerate(self.segments) if name in s.tensors]
            if not present:
                self._stacked[name] = None
            else:
                ab = [self.segments[i].tensors[name] for i in present]
                a, b = stack_adapters(ab)
                scal = torch.tensor([self.segments[i].scaling for i in present], dtype=torch.float32)
                # adapter index of each segment within the stack; -1 where the segment lacks this slot
                index = {seg: k for k, seg in enumerate(present)}
                seg_ads = [index.get(i, -1) for i in range(len(self.segments))]
                dtype = torch.promote_types(like.dtype, a.dtype)  # kernels/lora.py's rule: float32 beside a half base
                self._stacked[name] = (a.to(like.device, dtype), b.to(like.device, dtype), scal, seg_ads)
        return self._stacked[name]

    def _plan(self, seg_ads: list[int], n_adapters: int, t: int):
        key = (tuple(seg_ads), t)
        if key not in self._plans:
            ids = segment_ids([n * t for n in self.sizes], seg_ads)  # (B*T,)
            self._plans[key] = plan_segments(ids, n_adapters)
        return self._plans[key]

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA delta of slot `name` for x (B, T, in), or None when no segment adapts it."""
        stacked = self._stack(name, x)
        if stacked is None:
            return None
        a, b, scal, seg_ads = stacked
        x = x.to(a.dtype)  # before the dropout, as lora_delta does
        if x.shape[0] != self.batch:
            raise ValueError(f"the batch has {x.shape[0]} sequences, the binding's segments {self.batch}")
        if any(s.dropout > 0 for s in self.segments):
            parts = torch.split(x, self.sizes, dim=0)
            x = torch.cat(
                [
                    dropout_(p, s.dropout, s.generator) if s.dropout > 0 and name in s.tensors else p
                    for p, s in zip(parts, self.segments)
                ],
                dim=0,
            )
        plan = self._plan(seg_ads, a.shape[0], x.shape[1] if x.dim() == 3 else 1)
        return multilora_delta(x, a, b, scal, plan, impl=self.impl)


class LoRASlot(nn.Module):
    """A frozen layer plus the LoRA delta of whatever adapter is bound to this thread."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.slot_name = name
        self.in_features, self.out_features = _dims(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        binding = _BOUND.get()
        if binding is None:
            return out
        if isinstance(binding, MultiBinding):
            d = binding.delta(self.slot_name, x)
            return out if d is None else add_delta(out, d)
        ab = binding.tensors.get(self.slot_name)
        if ab is None:
            return out
        return add_delta(out, lora_delta(x, ab[0], ab[1], binding.scaling, binding.dropout, binding.generator))


@contextlib.contextmanager
def bind(binding: Binding | MultiBinding | None):
    """Makes `binding` the adapter seen by every LoRASlot called in this thread."""
    token = _BOUND.set(binding)
    try:
        yield
    finally:
        _BOUND.reset(token)


def inject_slots(
    blocks: nn.ModuleList,
    arch: Arch,
    global_index: list[int],
    targets: tuple[str, ...],
) -> list[SlotSpec]:
    """Replaces target layers inside `blocks` with LoRASlots, in place; returns the slots.

    Args:
        blocks: The block list of a (possibly partial) model.
        arch: Architecture adapter, for the state-dict prefix.
        global_index: Full-model index of each entry of `blocks`.
        targets: Module names (last path component) to wrap.
    """
    specs: list[SlotSpec] = []
    for local_i, block in enumerate(blocks):
        for path, module in list(block.named_modules()):
            leaf = path.rsplit(".", 1)[-1]
            if leaf not in targets or isinstance(module, LoRASlot):
                continue
            name = f"{arch.block_prefix}.{global_index[local_i]}.{path}"
            slot = LoRASlot(module, name)
            parent = block.get_submodule(path.rsplit(".", 1)[0]) if "." in path else block
            setattr(parent, leaf, slot)
            specs.append(SlotSpec(name, slot.in_features, slot.out_features))
    if not specs and targets:
        raise LayoutError(f"no module named any of {list(targets)} in the blocks")
    return specs


class LoRAAdapter(nn.Module):
    """The data owner's trainable LoRA tensors for a list of slots (owned by the client)."""

    def __init__(self, specs: list[SlotSpec], cfg: LoraConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.specs = list(specs)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for spec in self.specs:  # fixed order: identical init in split and local mode
            a = torch.empty(cfg.rank, spec.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # peft's default
            self.a.append(nn.Parameter(a))
            self.b.append(nn.Parameter(torch.zeros(spec.out_features, cfg.rank)))
        self._index = {s.name: i for i, s in enumerate(self.specs)}

    def binding(self, names=None, generator: torch.Generator | None = None) -> Binding:
        """A Binding over all slots (or just `names`) using the live parameters."""
        keep = self.specs if names is None else [self.specs[self._index[n]] for n in names]
        tensors = {s.name: (self.a[self._index[s.name]], self.b[self._index[s.name]]) for s in keep}
        return Binding(tensors, self.cfg.scaling, self.cfg.dropout, generator)

    def params_for(self, names) -> list[nn.Parameter]:
        """[A0, B0, A1, B1, ...] for the given slot names, in that order."""
        out = []
        for n in names:
            i = self._index[n]
            out += [self.a[i], self.b[i]]
        return out

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """peft-style keys (without the 'base_model.model.' prefix) to tensors."""
        out = {}
        for spec, a, b in zip(self.specs, self.a, self.b):
            out[f"{spec.name}.lora_A.weight"] = a
            out[f"{spec.name}.lora_B.weight"] = b
        return out


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates tensors into one flat float32 vector (the wire form of adapter weights)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def unflatten(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Inverse of flatten for known shapes; raises LayoutError when the size is wrong."""
    want = sum(math.prod(s) for s in shapes)
    if flat.numel() != want:
        raise LayoutError(f"adapter vector has {flat.numel()} values, expected {want}")
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[at : at + n].view(s))
        at += n
    return out


def slot_shapes(specs: list[SlotSpec], rank: int) -> list[torch.Size]:
    """Shapes [A0, B0, A1, B1, ...] of the LoRA tensors for these slots."""
    shapes = []
    for s in specs:
        shapes += [torch.Size((rank, s.in_features)), torch.Size((s.out_features, rank))]
    return shapes


@dataclass
class PeftMeta:
    """What adapter_config.json needs beyond LoraConfig."""

    base_model_name_or_path: str
    fan_in_fan_out: bool = False
    extra: dict = field(default_factory=dict)


def save_peft(adapter: LoRAAdapter, out_dir: str, meta: PeftMeta) -> None:
    """Writes adapter_config.json + adapter_model.safetensors that peft.PeftModel loads."""
    os.makedirs(out_dir, exist_ok=True)
    targets = sorted({s.name.rsplit(".", 1)[-1] for s in adapter.specs})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_model_name_or_path,
        "r": adapter.cfg.rank,
        "lora_alpha": adapter.cfg.alpha,
        "lora_dropout": adapter.cfg.dropout,
        "target_modules": targets,
        "layers_to_transform": list(adapter.cfg.layers) or None,  # None: every block
        "fan_in_fan_out": meta.fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        **meta.extra,
    }
    tensors = {f"base_model.model.{k}": v.detach().contiguous() for k, v in adapter.named_tensors().items()}
    tmp = os.path.join(out_dir, "adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_peft_tensors(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reads a peft LoRA directory: (adapter_config dict, {slot name: (A, B)} keyed tensors)."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    raw = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return config, {k.removeprefix("base_model.model."): v for k, v in raw.items()}


def config_dict(cfg: LoraConfig) -> dict:
    """LoraConfig as a JSON-able dict."""
    d = asdict(cfg)
    d["target_modules"] = list(cfg.target_modules)
    d["layers"] = list(cfg.layers)
    return d
