"""The Backbone interface: what the split servicer needs of a split-tuning service, in process or on Ray."""

from __future__ import annotations

from typing import Protocol

import torch

from tandem.stages.loading import LoadedModel
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout

from .batching import Batcher
from .client_stages import ClientFiles
from .limits import ServiceLimits
from .optimizer import AdamWSpec
from .sessions import Session, SessionStore


class Backbone(Protocol):
    """Serves the frozen middle of one model to many sessions; knows nothing of gRPC.

    Implemented by `SplitService` (cloud/split.py) and `RaySplitService` (cloud/ray_backend.py). The
    caller looks a session up in `store` with the caller's identity (a session belongs to the identity
    that opened it) and hands the Session to the methods, which do not look it up again.
    """

    loaded: LoadedModel  # the served model (its id and path)
    layout: StageLayout  # the split: the client's bottom and top blocks
    limits: ServiceLimits
    store: SessionStore  # the sessions, their owners and their forward state
    config_json: str  # the model's configuration, as the client rebuilds its stages from it
    client_files: ClientFiles  # what FetchClientStages streams (stages from a private file; none on a shard)
    batcher: Batcher | None  # the batching worker, when concurrent sessions share passes
    kill_revive: bool  # forward() takes Kill-and-Revive's live slots (cloud/remote_lora.py)
    generation: bool  # serves generation sessions (cloud/generation.py)

    def open_session(
        self,
        owner: str,
        model_id: str,
        lora: LoraConfig,
        remote_lora: bool,
        codec: str = "float32",
        gradient_codec: str = "float32",
        sid: str | None = None,
        optimizer: AdamWSpec | None = None,
    ) -> Session:
        """Opens a session of `owner`; with `optimizer`, the cloud applies the remote LoRA's updates itself."""
        ...

    def close_session(self, session: Session) -> None:
        """Closes a session and frees what it holds."""
        ...

    def forward(
        self,
        session: Session,
        step: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        lora_version: int,
        lora_flat: torch.Tensor | None,
        dropout_seed: int,
        train: bool,
        live: list[bool] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Runs the middle on (batch, seq, hidden) states; in train mode keeps the graph for backward.
        Returns (output, compute seconds). live: Kill-and-Revive's live slots (only when `kill_revive`)."""
        ...

    def backward(self, session: Session, step: int, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Back-propagates step's stored graph. Returns (grad input, flat LoRA grads, compute seconds)."""
        ...

    def remote_state(self, session: Session) -> dict:
        """A cloud optimizer session's remote LoRA and AdamW state (lora, exp_avg, exp_avg_sq, steps, version)."""
        ...

    def put_remote_state(
        self,
        session: Session,
        lora: torch.Tensor | None,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        steps: int,
        version: int,
    ) -> None:
        """Replaces a cloud optimizer session's remote LoRA and AdamW state (the client resumes a checkpoint)."""
        ...

    def stop(self) -> None:
        """Stops background work (the batching worker); what is still queued fails."""
        ...
