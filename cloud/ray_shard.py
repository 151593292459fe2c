"""A Ray actor running one pipeline shard of the middle blocks for one replica, and what it starts with."""

from __future__ import annotations

import dataclasses

import torch

from tandem.stages.loading import LoadedModel, load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout

from .batching import BatchingConfig
from .errors import InvalidRequest, SessionNotFound
from .limits import ServiceLimits
from .optimizer import AdamWSpec
from .sessions import Session, StoreConfig
from .split import SplitService

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # shards load it by its default path (None) rather than the door's


def shard_ranges(blocks: list[int], pipeline: int) -> list[list[int]]:
    """Splits the middle blocks into `pipeline` contiguous, near-equal ranges."""
    if not 1 <= pipeline <= len(blocks):
        raise InvalidRequest(f"--pipeline must be between 1 and the {len(blocks)} middle blocks, got {pipeline}")
    n, k = len(blocks), pipeline
    cuts = [round(i * n / k) for i in range(k + 1)]
    return [blocks[cuts[i] : cuts[i + 1]] for i in range(k)]


def on_the_wire(t: torch.Tensor) -> torch.Tensor:
    """A shard's output as the next shard and the front door take it: float32 on the CPU (an exact upcast)."""
    return t.float().cpu()


class MiddleShard:
    """A Ray actor: one contiguous range of middle blocks of one replica (wrapped by ray.remote at start-up).

    It keeps its own copy of each session (same id and owner as the front door's) and looks it up per call."""

    def __init__(
        self,
        model_path: str | None,
        layout: tuple[int, int, int],
        blocks: list[int],
        store: dict,
        limits: dict,
        threads: int = 0,
        batching: dict | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        if threads:
            torch.set_num_threads(threads)
        self.service = SplitService(
            load_model(model_path, device, dtype),
            StageLayout(*layout),
            StoreConfig(**store),
            ServiceLimits(**limits),
            blocks=blocks,
            serve_client_files=False,
            batching=BatchingConfig(**batching) if batching is not None else None,
        )

    def ready(self) -> int:
        return len(self.service.all_slots)

    def _session(self, owner: str, sid: str) -> Session:
        return self.service.store.get(sid, owner)

    def open(self, owner, model_id, lora: dict, remote_lora, codec, gradient_codec, sid, optimizer: dict | None = None):
        spec = AdamWSpec(**optimizer) if optimizer else None
        session = self.service.open_session(
            owner, model_id, LoraConfig(**lora), remote_lora, codec, gradient_codec, sid=sid, optimizer=spec
        )
        return len(session.slots)

    def remote_state(self, owner, sid) -> dict:
        return self.service.remote_state(self._session(owner, sid))

    def put_remote_state(self, owner, sid, *state) -> None:
        self.service.put_remote_state(self._session(owner, sid), *state)

    def forward(self, owner, sid, *args):
        out, seconds = self.service.forward(self._session(owner, sid), *args)
        return on_the_wire(out), seconds

    def backward(self, owner, sid, *args):
        grad_in, flat, seconds = self.service.backward(self._session(owner, sid), *args)
        return on_the_wire(grad_in), flat.cpu(), seconds

    def close(self, owner, sid) -> None:
        try:
            self.service.close_session(self._session(owner, sid))
        except SessionNotFound:
            pass


def shard_config(loaded: LoadedModel, layout: StageLayout, store: StoreConfig, limits: ServiceLimits, batching):
    """The arguments every shard actor starts with (after its blocks): plain values Ray can ship."""
    return {
        "model_path": loaded.path if loaded.model_id != DEFAULT_MODEL else None,
        "layout": (layout.num_layers, layout.bottom, layout.top),
        # The front door enforces the per-identity quota; a shard's lingering copies must not.
        "store": dataclasses.asdict(dataclasses.replace(store, max_sessions_per_identity=0)),
        "limits": dataclasses.asdict(limits),
        "batching": None if batching is None else dataclasses.asdict(batching),
        # Every shard computes in the door's resolved dtype; on CUDA, Ray gives each its own GPU (cuda inside it).
        "device": "cuda" if loaded.placement.device.type == "cuda" else "cpu",
        "dtype": loaded.placement.dtype_name,
    }
