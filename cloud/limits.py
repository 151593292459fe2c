"""What a split-tuning request may ask of the cloud: the service's limits, and the checks of requests against them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tandem.kernels.checks import all_finite
from tandem.kernels.codecs import CODECS
from tandem.stages.errors import LayoutError
from tandem.stages.lora import LoraConfig
from tandem.stages.lora_layers import check_layers

from .errors import InvalidRequest, clip
from .optimizer import AdamWSpec

MAX_ALPHA = 1e4  # LoRA alpha; the scale is alpha / rank, and a huge one only overflows the middle's activations


@dataclass
class ServiceLimits:
    """Per-request limits the service enforces."""

    max_tokens_per_step: int = 64 * 1024
    cloud_optimizer: bool = (
        True  # run the remote LoRA's optimizer for sessions that ask (`client tune --cloud-optimizer`)
    )
    max_lora_rank: int = 256  # a session's LoRA rank; its remote LoRA's size grows with it
    max_lora_targets: int = 16  # target module names in one LoraSpec

    def __post_init__(self):
        if self.max_lora_rank < 1 or self.max_lora_targets < 1:
            raise ValueError("--max-lora-rank and --max-lora-targets must be >= 1")


@dataclass
class RequestChecks:
    """Checks requests against the served middle and the limits; every failure is an InvalidRequest.

    Attributes:
        model_id: The served model's id.
        hidden_size: Width of the activations the middle takes and returns.
        max_positions: The model's positions: the longest sequence.
        middle_leaves: Names of the middle's adaptable layers (LoRA targets that exist).
        default_targets: The architecture's LoRA targets when a session names none.
        num_layers: Blocks of the served model (what lora_layers may name).
    """

    limits: ServiceLimits
    model_id: str
    hidden_size: int
    max_positions: int
    middle_leaves: tuple[str, ...]
    default_targets: tuple[str, ...]
    num_layers: int = 0

    def session(
        self,
        model_id: str,
        lora: LoraConfig,
        remote_lora: bool,
        codecs: tuple[str, ...],
        optimizer: AdamWSpec | None,
    ) -> set[str]:
        """Checks an OpenSession; returns the names of the layers its remote LoRA adapts."""
        if optimizer is not None and not self.limits.cloud_optimizer:
            raise InvalidRequest(
                "this server does not run optimizers for clients (cloud serve --no-cloud-optimizer); "
                "tune without --cloud-optimizer: your client then updates the remote LoRA itself"
            )
        if optimizer is not None and not remote_lora:
            raise InvalidRequest(
                "a cloud optimizer needs a remote LoRA (remote_lora=true): there is nothing else to optimize here"
            )
        if model_id and model_id != self.model_id:
            raise InvalidRequest(f"this server serves {self.model_id!r}, not {clip(model_id)}")
        for codec in codecs:
            if codec not in CODECS:
                raise InvalidRequest(f"codec {clip(codec)} is not supported; choose one of {list(CODECS)}")
        self.lora(lora)
        targets = set(lora.target_modules or self.default_targets)
        unknown = sorted(t for t in targets if t not in self.middle_leaves)
        if unknown:
            raise InvalidRequest(
                f"target modules {clip(unknown)} do not exist in this model; available: {list(self.middle_leaves)}"
            )
        return targets

    def lora(self, lora: LoraConfig) -> None:
        """Checks a session's LoRA settings: a finite alpha, and rank and targets within the limits."""
        if not math.isfinite(lora.alpha) or abs(lora.alpha) > MAX_ALPHA:
            raise InvalidRequest(
                f"LoRA alpha must be a finite number of magnitude <= {MAX_ALPHA:g}, got {clip(lora.alpha)}"
            )
        if lora.rank > self.limits.max_lora_rank:
            raise InvalidRequest(
                f"LoRA rank {lora.rank} is over this server's limit of {self.limits.max_lora_rank} "
                "(cloud serve --max-lora-rank); use a smaller --rank"
            )
        if len(lora.target_modules) > self.limits.max_lora_targets:
            raise InvalidRequest(
                f"{len(lora.target_modules)} target modules named, over this server's limit of "
                f"{self.limits.max_lora_targets} (cloud serve --max-lora-targets)"
            )
        try:
            check_layers(lora.layers, self.num_layers)
        except LayoutError as e:
            raise InvalidRequest(
                f"{clip(str(e))}; list each block that carries LoRA once (empty: every block)"
            ) from None

    def declared(self, shape, name: str) -> None:
        """Checks the shape a tensor message declares, before it is decoded (decoding allocates it): (batch, seq,
        hidden) within the tokens-per-step limit. Then activations() checks what was decoded."""
        dims = [int(d) for d in shape[:4]]
        if len(dims) != 3 or dims[2] != self.hidden_size:
            raise InvalidRequest(f"{name}: expected shape [batch, seq, {self.hidden_size}], got {dims}")
        if min(dims) > 0 and dims[0] * dims[1] > self.limits.max_tokens_per_step:  # negative, empty: decode's error
            raise InvalidRequest(
                f"{name}: {dims[0] * dims[1]} tokens in one step, over the server's limit of "
                f"{self.limits.max_tokens_per_step}; use a smaller batch"
            )

    def activations(self, h: torch.Tensor, mask: torch.Tensor | None, name: str) -> None:
        """Checks hidden states (or their gradient) of shape (batch, seq, hidden) and the attention mask."""
        if h.dim() != 3 or h.shape[2] != self.hidden_size:
            raise InvalidRequest(f"{name}: expected shape [batch, seq, {self.hidden_size}], got {list(h.shape)}")
        b, t = h.shape[0], h.shape[1]
        if b == 0 or t == 0:
            raise InvalidRequest(f"{name}: empty batch {list(h.shape)}")
        if b * t > self.limits.max_tokens_per_step:
            raise InvalidRequest(
                f"{name}: {b * t} tokens in one step, over the server's limit of "
                f"{self.limits.max_tokens_per_step}; use a smaller batch"
            )
        if t > self.max_positions:
            raise InvalidRequest(f"{name}: sequence length {t} exceeds the model's {self.max_positions} positions")
        if h.dtype != torch.float32:
            raise InvalidRequest(f"{name}: expected float32, got {h.dtype}")
        if not all_finite(h):
            raise InvalidRequest(f"{name}: contains NaN or Inf")
        if mask is not None:
            self.mask(mask, b, t)

    @staticmethod
    def mask(mask: torch.Tensor, b: int, t: int) -> None:
        """Checks an attention mask of shape (b, t): uint8 zeros and ones, a real token in every row."""
        if tuple(mask.shape) != (b, t):
            raise InvalidRequest(f"attention_mask: expected shape [{b}, {t}], got {list(mask.shape)}")
        if mask.dtype != torch.uint8 or bool(((mask != 0) & (mask != 1)).any()):
            raise InvalidRequest("attention_mask: expected uint8 zeros and ones")
        if bool((mask.sum(dim=1) == 0).any()):
            raise InvalidRequest("attention_mask: a row has no real token")
