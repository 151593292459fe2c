"""Architecture adapters: where a causal LM keeps its embeddings, blocks, norm and head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Arch:
    """How to take one Hugging Face causal-LM family apart into blocks.

    Attributes:
        family: Short name ("llama" covers Llama, SmolLM2, Qwen2, Mistral).
        decoder: Attribute of the CausalLM that holds the decoder ("model", "transformer").
        blocks: Attribute of the decoder that holds the block list ("layers", "h").
        embed: Attribute of the decoder holding the token embedding.
        pos_embed: Attribute holding absolute position embeddings, or None (rotary).
        rotary: Attribute holding the rotary embedding module, or None.
        norm: Attribute holding the final norm.
        lora_targets: peft's default LoRA target modules for this family.
        fan_in_fan_out: True when the targets store weights as (in, out) (GPT-2 Conv1D).
    """

    family: str
    decoder: str
    blocks: str
    embed: str
    pos_embed: str | None
    rotary: str | None
    norm: str
    lora_targets: tuple[str, ...]
    fan_in_fan_out: bool = False

    @property
    def block_prefix(self) -> str:
        """State-dict prefix of block i is f"{block_prefix}.{i}."."""
        return f"{self.decoder}.{self.blocks}"


LLAMA = Arch("llama", "model", "layers", "embed_tokens", None, "rotary_emb", "norm", ("q_proj", "v_proj"))
GPT2 = Arch("gpt2", "transformer", "h", "wte", "wpe", None, "ln_f", ("c_attn",), fan_in_fan_out=True)

_BY_MODEL_TYPE = {
    "llama": LLAMA,
    "qwen2": LLAMA,
    "mistral": LLAMA,
    "gpt2": GPT2,
}


def arch_for(config) -> Arch:
    """Returns the adapter for a transformers config, or raises UnsupportedModelError."""
    arch = _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if arch is None:
        raise UnsupportedModelError(
            f"model_type {getattr(config, 'model_type', None)!r} is not supported; supported: {sorted(_BY_MODEL_TYPE)}"
        )
    return arch


def num_blocks(config) -> int:
    """Number of transformer blocks in a config."""
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


@dataclass
class Parts:
    """Live references into one model instance, by role."""

    arch: Arch
    config: object
    embed: nn.Embedding
    pos_embed: nn.Embedding | None
    rotary: nn.Module | None
    blocks: nn.ModuleList
    norm: nn.Module
    head: nn.Linear


def parts_of(model: nn.Module) -> Parts:
    """Finds the embedding, blocks, norm and head of a causal LM."""
    arch = arch_for(model.config)
    dec = getattr(model, arch.decoder)
    return Parts(
        arch=arch,
        config=model.config,
        embed=getattr(dec, arch.embed),
        pos_embed=getattr(dec, arch.pos_embed) if arch.pos_embed else None,
        rotary=getattr(dec, arch.rotary) if arch.rotary else None,
        blocks=getattr(dec, arch.blocks),
        norm=getattr(dec, arch.norm),
        head=model.lm_head,
    )


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids used by every path (split, local, peft): arange(T), as the HF forward does.

    Batches are right-padded, so arange(T) is also the true position of every valid token.
    """
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)  # (1, T)
