"""StagedModel: the data owner's bottom and top stages, a middle (remote or in-process), one adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from tandem.stages.arch import arch_for
from tandem.stages.lora import LoRAAdapter, bind
from tandem.stages.modules import BottomStage, StageLayout, TopStage
from tandem.stages.precision import CPU_FLOAT32, Placement

from .data import IGNORE
from .errors import ClientError

if TYPE_CHECKING:
    from .session import Session


def stage_seed(seed: int, step: int, stage: int) -> int:
    """Seed of the dropout generator of one stage at one step (0 bottom, 1 middle, 2 top, 3 the cut transform)."""
    return (seed * 1_000_003 + step * 31 + stage) % (2**63 - 1)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (LoRA dropout masks and initial weights)."""
    return torch.Generator().manual_seed(seed)


@runtime_checkable
class Middle(Protocol):
    """The middle blocks, wherever they run: RemoteMiddle (the cloud) and LocalMiddle (this process)."""

    session: Session | None  # the live cloud session; None when nothing is sent
    params: list[nn.Parameter]  # remote LoRA parameters (the cloud runs them); [] when none
    cloud_optimizer: bool  # whether the cloud updates `params` itself

    def __call__(self, h: torch.Tensor, mask: torch.Tensor, step: int, seed: int, train: bool) -> torch.Tensor: ...

    def close(self) -> None: ...


class LocalMiddle(nn.Module):
    """The middle blocks in this process (local mode: the model owner's verification run; offsite: the emulator)."""

    session = None  # nothing is sent: no session, no sealer
    cloud_optimizer = False

    def __init__(self, stage: nn.Module, adapter: LoRAAdapter, names: list[str]):
        super().__init__()
        self.stage, self.adapter, self.names = stage, adapter, names
        self.params: list[nn.Parameter] = []  # no remote LoRA: the middle slots are trained here like any other

    def forward(self, h, mask, step: int, seed: int, train: bool):
        binding = self.adapter.binding(self.names, seeded_generator(seed) if train else None)
        if not train:
            binding.dropout = 0.0
        with bind(binding):
            return self.stage(h, mask)

    def close(self) -> None:
        """Nothing to close: no session."""


class StagedModel(nn.Module):
    """Bottom and top stages on the client, a middle (remote or local), and the data owner's adapter.

    `cut_transform` is THE hook for privacy code: fn(h, attention_mask, step, seed, train) -> h, applied to the
    bottom stage's output before it goes to the middle (e.g. clipping + noise as a defense, or recording what the
    cloud sees). It runs identically in every mode; None: h goes to the middle as it is.

    `placement` is where the client's stages compute (device, dtype); batches move there, the adapter sits there in
    float32, and the loss is taken in float32 from the logits.
    """

    def __init__(
        self,
        bottom: BottomStage,
        middle: Middle,
        top: TopStage,
        adapter: LoRAAdapter,
        names: tuple[list[str], list[str], list[str]],  # slot names per stage: bottom, middle, top
        layout: StageLayout,
        model_id: str,
        config,
        tokenizer,
        mode: str,
        cut_transform=None,
        stages_sha256: str = "",  # split mode: SHA-256 of the downloaded client stages (their cache key)
        placement: Placement = CPU_FLOAT32,
    ):
        super().__init__()
        self.placement = placement
        self.bottom, self.middle, self.top, self.adapter = bottom, middle, top, adapter
        self.names, self.layout, self.model_id, self.config = names, layout, model_id, config
        self.tokenizer, self.mode, self.stages_sha256 = tokenizer, mode, stages_sha256
        self.cut_transform = cut_transform

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, step: int, seed: int, train: bool) -> torch.Tensor:
        """Runs bottom -> middle -> top; returns (B, T, V) logits."""
        bottom_names, _, top_names = self.names
        dropout = self.adapter.cfg.dropout if train else 0.0
        ids, mask = ids.to(self.placement.device), mask.to(self.placement.device)

        def binding(names, stage):
            slots = self.adapter.binding(names, seeded_generator(stage_seed(seed, step, stage)) if dropout else None)
            slots.dropout = dropout
            return slots

        # Nothing below the top cut trains (a top-only adapter): the bottom runs without autograd, so no gradient
        # crosses the bottom cut and the middle makes one round trip (RemoteMiddle.forward).
        with (
            torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_below_top()),
            bind(binding(bottom_names, 0)),
        ):
            h = self.bottom(ids, mask)  # (B, T, H)
            if self.cut_transform is not None:
                h = self.cut_transform(h, mask, step, stage_seed(seed, step, 3), train)
        h = self.middle(h, mask, step, stage_seed(seed, step, 1), train)  # (B, T, H)
        with bind(binding(top_names, 2)):
            return self.top(h, mask)  # (B, T, V)

    def trains_below_top(self) -> bool:
        """Whether anything below the top cut is trainable: bottom or middle LoRA, the remote LoRA, the client's
        bottom blocks (--tune-client-blocks) or a cut transform with parameters (a fixed-noise defense has none)."""
        bottom_names, middle_names, _ = self.names
        if bottom_names or middle_names or any(p.requires_grad for p in self.middle.params):
            return True
        cut = self.cut_transform
        trainable = list(self.bottom.parameters()) + (list(cut.parameters()) if isinstance(cut, nn.Module) else [])
        return any(p.requires_grad for p in trainable)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, step: int, seed: int, train: bool) -> torch.Tensor:
        """Runs bottom -> middle -> top; returns (B, T, V) logits."""
        return self(ids, mask, step, seed, train)

    def loss(self, batch: dict, step: int, seed: int, train: bool) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over labelled tokens; returns (loss, number of labelled tokens)."""
        logits = self.logits(batch["input_ids"], batch["attention_mask"], step, seed, train)
        labels = batch["labels"][:, 1:].to(logits.device)  # (B, T-1)
        n = int((labels != IGNORE).sum())
        flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V) float32 whatever the compute dtype
        loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum") / max(n, 1)
        return loss, n

    def client_blocks(self) -> list[tuple[int, nn.Module]]:
        """(full-model block index, block) for every block that runs on the client."""
        return list(zip(self.layout.bottom_blocks, self.bottom.blocks)) + list(
            zip(self.layout.top_blocks, self.top.blocks)
        )

    def unfreeze_client_blocks(self) -> list[nn.Parameter]:
        """Makes the client's blocks fully trainable (Offsite-Tuning's adapter layers); returns their parameters.

        Only in float32: these weights are trained themselves, with no float32 master copy beside a half dtype."""
        if self.placement.dtype != torch.float32:
            raise ClientError(
                f"--tune-client-blocks trains the client's blocks in their compute dtype, and {self.placement.dtype_name} "
                "has no float32 master copy to take AdamW's small updates; use --dtype float32 (LoRA alone trains in any)"
            )
        params = []
        for _, block in self.client_blocks():
            for p in block.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    def client_block_state(self) -> dict[str, torch.Tensor]:
        """The client's blocks under their full-model names (for saving fully tuned blocks)."""
        prefix = arch_for(self.config).block_prefix
        out = {}
        for block_id, block in self.client_blocks():
            for k, v in block.state_dict().items():
                out[f"{prefix}.{block_id}.{k.replace('.base_layer.', '.')}"] = v.detach().contiguous()
        return out

    @property
    def session(self) -> Session | None:
        """The live cloud session (split mode; None otherwise): its codecs and sealer, for recording and the report."""
        return self.middle.session

    def close(self) -> None:
        """Closes the middle's cloud session, if it has one."""
        self.middle.close()
