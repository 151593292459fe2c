"""The bytes one split training step carries each way, from the shapes and the wire codecs alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.kernels.codecs import bytes_per_value


@dataclass(frozen=True)
class StepBytes:
    """Serialized tensor bytes of one training step (forward and backward), client to cloud and back.

    Attributes:
        up: Client to cloud: the hidden states at the bottom cut, the gradient at the top cut, the remote LoRA
            (unless the cloud runs its optimizer) and a 1-byte mask per token.
        down: Cloud to client: the middle's output, the gradient at the bottom cut, the remote LoRA's gradients.
    """

    up: int
    down: int

    @property
    def total(self) -> int:
        return self.up + self.down


def step_bytes(
    batch_tokens: int,
    hidden_size: int,
    lora_params: int,
    codec: str = "float32",
    gradient_codec: str = "",
    lora_codec: str = "float32",
    backward: bool = True,
) -> StepBytes:
    """What a training step of `batch_tokens` tokens must carry (tensor payloads; message framing excluded).

    Args:
        lora_params: Elements of the remote LoRA that cross each way (0 with a cloud optimizer or none).
        gradient_codec: Codec of the gradients at the cuts; empty means `codec`.
        backward: Whether the step crosses back (False: nothing below the top cut trains, a top-only adapter;
            one round trip, no gradient at either cut, and no remote LoRA either way).
    """
    values = batch_tokens * hidden_size  # one (B, T, H) tensor
    hidden = math.ceil(values * bytes_per_value(codec))
    grads = math.ceil(values * bytes_per_value(gradient_codec or codec)) if backward else 0
    lora = math.ceil(lora_params * bytes_per_value(lora_codec)) if backward else 0
    return StepBytes(up=hidden + grads + lora + batch_tokens, down=hidden + grads + lora)
