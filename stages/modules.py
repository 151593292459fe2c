"""The three stages of a split causal LM: client bottom, cloud middle, client top."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .arch import Parts, num_blocks, positions
from .errors import LayoutError


@dataclass(frozen=True)
class StageLayout:
    """Where the model is cut: the client runs `bottom` blocks below and `top` blocks above the cloud.

    Attributes:
        num_layers: Blocks in the full model.
        bottom: K, blocks on the client after the embeddings.
        top: M, blocks on the client before the final norm and head.
    """

    num_layers: int
    bottom: int = 2
    top: int = 2

    def __post_init__(self):
        if self.bottom < 1 or self.top < 0:
            raise LayoutError(f"client blocks must be K>=1 and M>=0, got {self.bottom}:{self.top}")
        if self.bottom + self.top >= self.num_layers:
            raise LayoutError(
                f"client blocks {self.bottom}:{self.top} leave no block for the cloud "
                f"(the model has {self.num_layers}); choose K+M < {self.num_layers}"
            )

    @property
    def bottom_blocks(self) -> list[int]:
        return list(range(self.bottom))

    @property
    def middle_blocks(self) -> list[int]:
        return list(range(self.bottom, self.num_layers - self.top))

    @property
    def top_blocks(self) -> list[int]:
        return list(range(self.num_layers - self.top, self.num_layers))

    @property
    def client_blocks(self) -> list[int]:
        return self.bottom_blocks + self.top_blocks

    @classmethod
    def parse(cls, text: str, config) -> StageLayout:
        """Parses 'K:M' for a model config."""
        try:
            k, m = (int(x) for x in text.split(":"))
        except ValueError:
            raise LayoutError(f"--client-blocks must look like K:M (e.g. 2:2), got {text!r}") from None
        return cls(num_blocks(config), k, m)


def run_blocks(parts: Parts, blocks, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Runs a sequence of blocks with the model's own mask and position handling.

    Args:
        parts: The model the blocks belong to (for config, rotary embedding).
        blocks: Iterable of decoder blocks.
        h: Hidden states (B, T, H).
        attention_mask: 2-D padding mask (B, T), 1 for real tokens.
    """
    pos = positions(attention_mask)  # (1, T)
    mask = create_causal_mask(
        config=parts.config, inputs_embeds=h, attention_mask=attention_mask, cache=None, position_ids=pos
    )
    kwargs = {"attention_mask": mask}
    if parts.rotary is not None:
        kwargs["position_embeddings"] = parts.rotary(h, pos)
        kwargs["position_ids"] = pos
    for block in blocks:
        out = block(h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, H)
    return h


class BottomStage(nn.Module):
    """Embeddings and the first K blocks (client side)."""

    def __init__(self, parts: Parts, block_ids: list[int]):
        super().__init__()
        self.parts = parts
        self.blocks = nn.ModuleList(parts.blocks[i] for i in block_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.parts.embed(input_ids)  # (B, T, H)
        if self.parts.pos_embed is not None:
            h = h + self.parts.pos_embed(positions(attention_mask))
        return run_blocks(self.parts, self.blocks, h, attention_mask)


class MiddleStage(nn.Module):
    """The frozen middle blocks (cloud side, or in-process in local mode)."""

    def __init__(self, parts: Parts, block_ids: list[int]):
        super().__init__()
        self.parts = parts
        self.blocks = nn.ModuleList(parts.blocks[i] for i in block_ids)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.parts, self.blocks, h, attention_mask)


class TopStage(nn.Module):
    """The last M blocks, final norm and LM head (client side)."""

    def __init__(self, parts: Parts, block_ids: list[int]):
        super().__init__()
        self.parts = parts
        self.blocks = nn.ModuleList(parts.blocks[i] for i in block_ids)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = run_blocks(self.parts, self.blocks, h, attention_mask)
        return self.parts.head(self.parts.norm(h))  # (B, T, V)
