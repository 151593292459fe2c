"""Sizing a deployment from a model's config alone: downloads, bytes per step, weights, forward state, sessions."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from tandem.kernels.codecs import CODECS
from tandem.stages.arch import arch_for, parts_of
from tandem.stages.errors import ModelLoadError
from tandem.stages.loading import DEFAULT_MODEL_ID, default_model_dir, shell_config, tokenizer_files
from tandem.stages.lora import LoraConfig, inject_slots
from tandem.stages.lora_layers import check_layers, format_layers, select_slots
from tandem.stages.modules import MiddleStage, StageLayout
from tandem.stages.traffic import step_bytes

from .admission import FORWARD_STATE_MODES, AdapterShape, StateModel
from .flags import DEFAULT_MEMORY_CAP_MB
from .sessions import Session
from .split import linear_leaves

# The dtypes a cloud can serve in, as safetensors names them.
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class PlanConfig:
    """What to size: the model and its cut, one step's shape, the serving dtype, the wire and the sessions.

    Attributes:
        model: A Hugging Face causal-LM directory (only config.json and the tokenizer files are read); None is
            the default model.
        client_blocks: K:M, the blocks the client runs below and above the cloud.
        batch_size, seq_len: One training step's shape (sequences, tokens per sequence).
        dtype: The dtype the cloud serves (and ships the client's stages) in.
        sessions: Sessions the deployment should hold at once.
        codec: Wire codec of the activations and gradients at the cuts.
        lora_rank, lora_targets: The sessions' remote LoRA (empty targets: the architecture's default).
        lora_layers: The blocks that carry LoRA; with none below the top cut a step is one round trip, no gradients.
        cloud_optimizer: The cloud applies the remote LoRA's AdamW updates (no LoRA crosses the wire per step).
        memory_cap_mb: The server's --memory-cap-mb.
    """

    model: str | None = None
    client_blocks: str = "2:2"
    batch_size: int = 4
    seq_len: int = 128
    dtype: str = "float32"
    sessions: int = 1
    codec: str = "float32"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ()
    cloud_optimizer: bool = False
    memory_cap_mb: float = DEFAULT_MEMORY_CAP_MB
    lora_layers: tuple[int, ...] = ()  # the blocks that carry LoRA (client tune --lora-layers); empty: every block

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "sessions", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.memory_cap_mb) and self.memory_cap_mb > 0):
            raise ValueError(f"--memory-cap-mb must be a number > 0, got {self.memory_cap_mb}")
        if self.dtype not in _SAFETENSORS_DTYPE:
            raise ValueError(f"--dtype must be one of {list(_SAFETENSORS_DTYPE)}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise ValueError(f"--codec must be one of {list(CODECS)}, got {self.codec!r}")


def read_config(model_dir: str | None):
    """(config, model id, directory) of a model directory, or of the default model, without loading weights."""
    from transformers import AutoConfig

    if model_dir is None:
        model_dir, model_id = default_model_dir(), DEFAULT_MODEL_ID
    elif not os.path.isdir(model_dir):
        raise ModelLoadError(f"--model {model_dir!r} is not a directory; pass a Hugging Face causal-LM directory")
    else:
        model_id = os.path.basename(os.path.normpath(model_dir))
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"cannot read a model config from {model_dir!r}: {' '.join(str(e).split())[:160]}"
        ) from None
    arch_for(config)  # an unsupported architecture fails here, in one line
    return config, model_id, model_dir


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM on the meta device (shapes only, no memory), frozen and in eval mode as the cloud holds it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def tensor_bytes(tensors, dtype: torch.dtype) -> int:
    """Bytes of `tensors` held in `dtype`."""
    return sum(t.numel() for t in tensors) * torch.empty(0, dtype=dtype).element_size()


def safetensors_size(state: dict, dtype_name: str) -> int:
    """The size of pack_state(state) with every tensor in `dtype_name`: 8-byte length, JSON header, data."""
    item = torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()
    header, offset = {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * item
        header[name] = {
            "dtype": _SAFETENSORS_DTYPE[dtype_name],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def client_state_shapes(config, layout: StageLayout) -> dict:
    """The tensors the client downloads (client_state's names and shapes), from its shell model on the meta device."""
    state = meta_model(shell_config(config, layout), torch.float32).state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings: not shipped, as client_state leaves it out
    return state


def client_side(config, layout: StageLayout, dtype_name: str, model_dir: str) -> dict:
    """The client's one-time download (its stages and the tokenizer files) and the memory its stage weights take."""
    state = client_state_shapes(config, layout)
    stages = safetensors_size(state, dtype_name)
    tokenizer = sum(len(blob) for blob in tokenizer_files(model_dir).values())
    return {
        "download_bytes": stages + tokenizer,
        "stages_bytes": stages,
        "tokenizer_bytes": tokenizer,
        "weights_bytes": tensor_bytes(state.values(), getattr(torch, dtype_name)),
        "params": sum(t.numel() for t in state.values()),
    }


def plan_session(parts, layout: StageLayout, cfg: PlanConfig) -> Session:
    """A session as the server would open it for this plan: its LoRA slots in the middle (the meta model's)."""
    middle = nn.ModuleList(parts.blocks[i] for i in layout.middle_blocks)
    slots = inject_slots(middle, parts.arch, layout.middle_blocks, linear_leaves(middle))
    lora = LoraConfig(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank, target_modules=cfg.lora_targets)
    targets = set(lora.target_modules or parts.arch.lora_targets)
    unknown = sorted(targets - {slot.name.rsplit(".", 1)[-1] for slot in slots})
    if unknown:
        raise ValueError(f"--lora-targets {unknown} are not layers of the middle blocks")
    chosen = [slot for slot in select_slots(slots, cfg.lora_layers) if slot.name.rsplit(".", 1)[-1] in targets]
    return Session("plan", "plan", lora, chosen, True, cfg.codec)


def middle_state_model(parts, layout: StageLayout) -> StateModel:
    """Admission's StateModel for the whole middle, fitted on one and on two of its blocks and extended to all.

    Only these blocks are made real (uninitialised, nothing loaded); every block of the middle has the same shape,
    so the state of n blocks is the one block's plus n-1 times what a second block adds.
    """
    hidden = int(parts.embed.weight.shape[1])
    config = parts.config
    max_positions = int(getattr(config, "max_position_embeddings", 0) or config.n_positions)
    ids = layout.middle_blocks[:2]
    for i in ids:
        parts.blocks[i].to_empty(device="cpu")
    if parts.rotary is not None:
        parts.rotary.to_empty(device="cpu")
    owner = nn.ModuleList(parts.blocks[i] for i in ids)
    fitted = [StateModel(MiddleStage(parts, ids[:n]), owner, hidden, max_positions) for n in range(1, len(ids) + 1)]
    one = fitted[0]
    if len(fitted) == 2:
        more = len(layout.middle_blocks) - 1
        one.fit = {pad: tuple(a + more * (b - a) for a, b in zip(one.fit[pad], fitted[1].fit[pad])) for pad in one.fit}
    return one


def remote_lora_params(session: Session) -> int:
    """Elements of a session's remote LoRA: A (r x in) and B (out x r) of every slot it adapts."""
    return sum(session.lora_cfg.rank * (slot.in_features + slot.out_features) for slot in session.slots)


def resident_bytes(session: Session, cloud_optimizer: bool) -> int:
    """What a session holds for its life, as SplitService.open_session counts it: the float32 remote LoRA, and
    with a cloud optimizer its two AdamW moments."""
    return 4 * remote_lora_params(session) * (3 if cloud_optimizer else 1)


def cloud_side(cfg: PlanConfig, model: nn.Module, layout: StageLayout, session: Session, backward: bool = True) -> dict:
    """The cloud's weights, each session's resident LoRA and forward state per mode (none without a backward: a
    step that does not cross back keeps nothing), and the sessions that fit."""
    parts = parts_of(model)
    weights = tensor_bytes(model.parameters(), getattr(torch, cfg.dtype))
    states = middle_state_model(parts, layout)
    adapter = AdapterShape.of(session)
    padded = cfg.sessions > 1  # concurrent sessions share batched passes, whose rows are padded
    modes = FORWARD_STATE_MODES
    state = {
        mode: states.estimate(mode, cfg.batch_size, cfg.seq_len, padded, adapter) if backward else 0 for mode in modes
    }
    resident = resident_bytes(session, cfg.cloud_optimizer)
    cap = int(cfg.memory_cap_mb * 2**20)
    return {
        "weights_bytes": weights,
        "params": sum(p.numel() for p in model.parameters()),
        "session_resident_bytes": resident,
        "forward_state_bytes": state,
        "memory_cap_bytes": cap,
        "sessions_fit": {mode: cap // max(1, state[mode] + resident) for mode in modes},
        "total_bytes": {mode: weights + cfg.sessions * (state[mode] + resident) for mode in modes},
    }


def plan(cfg: PlanConfig) -> dict:
    """What the deployment needs (the numbers `cloud plan --json` prints); reads the config, loads no weights."""
    config, model_id, model_dir = read_config(cfg.model)
    layout = StageLayout.parse(cfg.client_blocks, config)
    model = meta_model(config, getattr(torch, cfg.dtype))
    parts = parts_of(model)
    max_positions = int(getattr(config, "max_position_embeddings", 0) or config.n_positions)
    if cfg.seq_len > max_positions:
        raise ValueError(f"--seq-len {cfg.seq_len} is over the model's {max_positions} positions")
    hidden = int(parts.embed.weight.shape[1])
    client = client_side(config, layout, cfg.dtype, model_dir)
    session = plan_session(parts, layout, cfg)
    check_layers(cfg.lora_layers, layout.num_layers)
    lora_params = remote_lora_params(session)
    # With no LoRA below the top cut nothing there trains: one round trip a step, no gradient crosses.
    backward = not cfg.lora_layers or any(block < layout.num_layers - layout.top for block in cfg.lora_layers)
    lora_up = 0 if cfg.cloud_optimizer else lora_params
    traffic = step_bytes(cfg.batch_size * cfg.seq_len, hidden, lora_up, cfg.codec, backward=backward)
    return {
        "model": model_id,
        "architecture": config.model_type,
        "blocks": layout.num_layers,
        "hidden_size": hidden,
        "client_blocks": f"{layout.bottom}:{layout.top}",
        "middle_blocks": len(layout.middle_blocks),
        "dtype": cfg.dtype,
        "codec": cfg.codec,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "sessions": cfg.sessions,
        "lora": {
            "rank": cfg.lora_rank,
            "slots": len(session.slots),
            "remote_params": lora_params,
            "cloud_optimizer": cfg.cloud_optimizer,
            "layers": format_layers(cfg.lora_layers),
            "round_trips_per_step": 2 if backward else 1,
        },
        "client": client,
        "step_bytes": {"up": traffic.up, "down": traffic.down, "total": traffic.total},
        "cloud": cloud_side(cfg, model, layout, session, backward),
    }
