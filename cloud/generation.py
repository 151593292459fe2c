"""Generation sessions: the middle's KV cache per session, under a cap, extended by each Forward (no Backward)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tandem.stages.kv_cache import new_cache, run_cached
from tandem.stages.lora import Binding, bind

from . import remote_lora
from .errors import InvalidRequest, TooLarge

DEFAULT_MAX_CACHE_TOKENS = 4096  # cached positions (batch x length) per session: `cloud serve --max-cache-tokens`


@dataclass
class GenerationState:
    """A generation session's cache of the middle blocks' keys and values, and what it holds."""

    max_tokens: int  # most cached positions (batch x length)
    cache: object = None  # transformers DynamicCache, made by a Forward with past_length 0
    length: int = 0  # positions per row the cache holds
    batch: int = 0

    def rewind(self, past_length: int) -> None:
        """Drops the cached positions after `past_length` (every layer the middle filled)."""
        try:
            self.cache.crop(past_length - self.length)
        except (RuntimeError, ValueError) as e:  # e.g. a sliding-window layer that no longer holds them
            self.cache, self.length = None, 0
            raise InvalidRequest(f"this cache cannot go back to {past_length} positions ({e}); start over") from None
        self.length = past_length

    def check(self, past_length: int, batch: int, new: int) -> None:
        """Refuses a Forward that names more positions than the cache holds, or that would grow it over the cap (fewer
        is a retry whose reply was lost, or a client going back: the cache is cut back to them)."""
        if past_length < 0:
            raise InvalidRequest(f"past_length must be >= 0, got {past_length}")
        if past_length > self.length:
            raise InvalidRequest(
                f"past_length {past_length} is more than the {self.length} positions this session's cache holds; "
                f"send past_length={self.length}, or 0 to start over"
            )
        if past_length and batch != self.batch:
            raise InvalidRequest(
                f"batch size changed from {self.batch} to {batch} in the middle of a cache; start over with past_length=0"
            )
        if batch * (past_length + new) > self.max_tokens:
            raise TooLarge(
                f"the cache would hold {batch} x {past_length + new} positions, over the server's cap of "
                f"{self.max_tokens} per session (cloud serve --max-cache-tokens); generate fewer tokens or prompts"
            )


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(config, blocks: int, element_size: int) -> int:
    """Bytes of keys and values one cached position takes in `blocks` blocks of a model with `config`."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * blocks * kv_heads * head_dim * element_size


def begin(service, session) -> None:
    """Makes `session` a generation session: its cache's worst case counts in the store's memory cap from now,
    for the session's life. Refused (the session closed) when the backend or the session's options do not allow it."""
    try:
        if not service.generation:
            raise InvalidRequest("this server's backend (Ray) does not serve generation sessions")
        if session.opt_spec is not None:
            raise InvalidRequest("a generation session trains nothing: open it without a cloud optimizer")
        max_tokens = service.store.cfg.max_cache_tokens
        per_token = kv_bytes_per_token(
            service.loaded.config, len(service.middle.blocks), element_size(service.placement.dtype)
        )
        service.store.hold(session, max_tokens * per_token)
    except BaseException:
        service.close_session(session)
        raise
    session.generation = GenerationState(max_tokens)


def refuse_backward(session) -> None:
    """Backward has nothing to run in a generation session."""
    if session.generation is not None:
        raise InvalidRequest("this is a generation session: it keeps a KV cache for decoding and runs no Backward")


def forward(service, session, past_length: int, hidden, mask, lora_version: int, lora_flat, train: bool):
    """Runs the middle on the new positions `hidden` (B, T, H) over the cache; `mask` (B, past_length + T) covers
    past and new. Returns (output (B, T, H), compute seconds)."""
    if train:
        raise InvalidRequest("train=true in a generation session: it only decodes (open a tuning session to train)")
    service.checks.activations(hidden, None, "hidden")
    batch, new = hidden.shape[:2]
    state: GenerationState = session.generation
    with session.lock:
        state.check(past_length, batch, new)
        service.checks.mask(mask, batch, past_length + new)
        if past_length + new > service.max_positions:
            raise InvalidRequest(f"{past_length + new} positions exceed the model's {service.max_positions}")
        lora = remote_lora.lora_for(session, lora_version, lora_flat)
        tensors = {slot.name: (lora[2 * i], lora[2 * i + 1]) for i, slot in enumerate(session.slots)}
        hidden = hidden.to(service.placement.device, service.placement.dtype)
        mask = mask.to(service.placement.device, torch.long)
        if past_length == 0:
            state.cache, state.length = new_cache(service.parts), 0
        elif past_length < state.length:  # a retried Forward whose reply was lost: the cache goes back first
            state.rewind(past_length)
        start = time.perf_counter()
        try:
            with torch.no_grad(), bind(Binding(tensors, session.lora_cfg.scaling)):
                out = run_cached(service.parts, service.middle.blocks, hidden, mask, state.cache, past_length)
        except BaseException:
            state.cache, state.length = None, 0  # part of the blocks may have grown: the cache is unusable
            raise
        state.length, state.batch = past_length + new, batch
        session.last_used = time.monotonic()
        return out, time.perf_counter() - start
