"""Blocks over a KV cache: new positions run against the keys and values a transformers cache holds (generation)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from .arch import Parts


def new_cache(parts: Parts) -> DynamicCache:
    """An empty cache for the blocks of `parts` (one layer per block of the model's config; unused ones stay empty)."""
    return DynamicCache(config=parts.config)


def cached_positions(attention_mask: torch.Tensor, past: int) -> torch.Tensor:
    """Positions (B, T) of the new tokens: real tokens counted from 0 in each row (left padding does not count),
    as the server's decoding uses them (cloud/decode.py); `attention_mask` covers past and new (B, past + T)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]


def layer_index(block: nn.Module) -> int:
    """The cache layer a block's attention writes (its `layer_idx`)."""
    for module in block.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    raise ValueError(f"{type(block).__name__} has no attention with a layer_idx")


def run_cached(
    parts: Parts, blocks, h: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache, past: int
) -> torch.Tensor:
    """Runs `blocks` on the new positions `h` (B, T, H), appending their keys and values to `cache`.

    Args:
        attention_mask: 2-D padding mask over past and new positions (B, past + T), 1 for real tokens.
        past: Positions `cache` already holds for these blocks.
    """
    blocks = list(blocks)
    pos = cached_positions(attention_mask, past)  # (B, T)
    mask = create_causal_mask(
        config=parts.config,
        inputs_embeds=h,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=pos,
        layer_idx=layer_index(blocks[0]),
    )
    kwargs = {"attention_mask": mask, "cache": cache, "use_cache": True}
    if parts.rotary is not None:
        kwargs["position_embeddings"] = parts.rotary(h, pos)
        kwargs["position_ids"] = pos
    for block in blocks:
        out = block(h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, H)
    return h


def embed_cached(parts: Parts, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
    """The embeddings of the new tokens (B, T, H), with GPT-2's absolute positions added at their cached positions."""
    h = parts.embed(input_ids)
    if parts.pos_embed is not None:
        h = h + parts.pos_embed(cached_positions(attention_mask, past))
    return h


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the keys and values a cache holds."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
