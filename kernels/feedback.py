"""Error feedback for the int8/int4 wire codecs: each gradient stream carries its quantization error into its next step,
and every int8/int4 tensor is rotated before its blockwise quantization.

EF-SGD style, sender-side only: a stream (the client's grad_output at the top cut, the cloud's grad_input at the
bottom cut) keeps the residual r = (x + r_prev) - decode(encode(x + r_prev)) of its last step and adds it to the
next step's tensor, so the sum of what arrived over steps tracks the sum of the true tensors within one
quantization step (the error does not accumulate). The receiver keeps no state.

The rotation (both sides of an error-feedback session, every int8/int4 hidden and gradient, evaluation included):
fixed random signs per channel, then an orthonormal Hadamard transform over groups of up to 64 channels; the
receiver undoes it after decoding (`received`). SmolLM2's residual stream has a few channels 100x the rest (and
one of 20,000 on the first token at the top cut): without rotation the absmax scale of their 128-value block
rounds the other 127 values to zero. A forward of SmolLM2 with int4 at both cuts (2 x 64 tokens of the sample
data) lost 18.8% of its loss without rotation, 1.5% with it (0.3% with blocks of 64, at 0.141x float32 bytes).

Gradients carry, activations do not (CARRIED). A gradient's effect is summed over steps by the parameter
updates, which is what a carried error corrects. An activation's content changes every step (other samples):
a residual carried into the next step's activations is another batch's error, so each forward gets the
difference of two errors (about 1.4x the plain error) and nothing sums it back. Measured on SmolLM2 in process
(LoRA r=8 on q,v, 100 steps of 2x64, int4 at both cuts, validation loss computed exactly): float32 0.931, plain
int4 0.939, int4 with the activations' error carried too 0.957. Per-sample deltas (AQ-SGD) would need state
on both sides, and a sample seen once or twice in a run gains nothing from them.

The state is keyed by step: encoding a step again (a transport retry, a step redone after a lost session)
starts from the residual of the steps before it, so it sends the same bytes and leaves the same state. A
stream restarts from zero when the shape changes or the step goes backwards. Float codecs pass through.
"""

from __future__ import annotations

import functools
import threading

import torch

from . import codecs

LOSSY = ("int8", "int4")
CARRIED = ("grad_output", "grad_input")  # the streams that carry their error (see the module docstring)
MAX_GROUP = 64  # the rotation's group: the largest power of two <= 64 that divides the last dimension


def _group(dim: int) -> int:
    group = 1
    while group < MAX_GROUP and dim % (group * 2) == 0:
        group *= 2
    return group


@functools.lru_cache(maxsize=4)  # bounded: the dimension comes from the network (a tensor's shape)
def _rotation(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random signs (one per channel) and the orthonormal Hadamard matrix of the group, for `dim`."""
    group = _group(dim)
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < group:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(0x7A4D0E)).float() * 2 - 1
    return signs, hadamard / group**0.5


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Random-sign Hadamard rotation of the last dimension in groups of up to 64 (orthonormal): an outlier channel's
    magnitude spreads over its group, so it no longer zeroes the other values of its absmax block."""
    signs, hadamard = _rotation(x.shape[-1])
    signs, hadamard = signs.to(x.device), hadamard.to(x.device)
    group = hadamard.shape[0]
    return ((x.float() * signs).reshape(*x.shape[:-1], -1, group) @ hadamard).reshape(x.shape)


def unrotate(x: torch.Tensor) -> torch.Tensor:
    """The inverse of rotate (the Hadamard matrix is symmetric and orthonormal)."""
    signs, hadamard = _rotation(x.shape[-1])
    signs, hadamard = signs.to(x.device), hadamard.to(x.device)
    group = hadamard.shape[0]
    return (x.float().reshape(*x.shape[:-1], -1, group) @ hadamard).reshape(x.shape) * signs


def received(x: torch.Tensor, codec: str) -> torch.Tensor:
    """What a receiver in an error-feedback session does after decoding: undo the sender's rotation (lossy codecs)."""
    return unrotate(x) if codec in LOSSY and x.dim() > 0 and x.shape[-1] > 0 else x


class Stream:
    """One sender stream's residual, keyed by step (see the module docstring)."""

    def __init__(self, codec: str, block: int = codecs.DEFAULT_BLOCK, carry: bool = True):
        if codec not in codecs.CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {codecs.CODECS}")
        self.codec, self.block, self.carry = codec, block, carry
        self.base: torch.Tensor | None = None  # residual carried into `step` (from the steps before it)
        self.step: int | None = None  # the last step encoded
        self.residual: torch.Tensor | None = None  # what `step` left to carry into the next one

    @property
    def nbytes(self) -> int:
        """Bytes this stream holds (its base and its residual)."""
        return sum(t.numel() * t.element_size() for t in (self.base, self.residual) if t is not None)

    def encode(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """codecs.encode of rotate(x) plus the carried residual; returns (values, scales) and keeps the new residual.
        Not carrying (activations) or at a negative step (evaluation): the rotated tensor alone, no state."""
        if self.codec not in LOSSY:
            return codecs.encode(x.detach(), self.codec, self.block)
        if not self.carry or step < 0:
            return codecs.encode(rotate(x.detach()), self.codec, self.block)
        if self.step is not None and step != self.step:
            self.base = self.residual if step > self.step else None  # next step: commit; backwards: restart
        self.step = step
        y = rotate(x.detach())
        if self.base is not None and self.base.shape == y.shape and self.base.device == y.device:
            y = y + self.base
        values, scales = codecs.encode(y, self.codec, self.block)
        self.residual = y - codecs.decode(values, scales, self.codec, tuple(y.shape), self.block)
        return values, scales


class Feedback:
    """A sender's streams by name, made on first use; thread-safe (one lock: a session's calls are sequential)."""

    def __init__(self):
        self.streams: dict[str, Stream] = {}
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes the streams hold."""
        return sum(stream.nbytes for stream in self.streams.values())

    def encoder(self, name: str, codec: str, step: int):
        """A `tensor -> (values, scales)` encoder of stream `name` at `step` (rotated; carrying its error for a
        gradient stream at a training step), or None for a float codec (exact or half precision: nothing to do)."""
        if codec not in LOSSY:
            return None
        if step < 0 or name not in CARRIED:
            return lambda x: Stream(codec, carry=False).encode(x, step)

        def encode(x: torch.Tensor):
            with self.lock:
                stream = self.streams.get(name)
                if stream is None or stream.codec != codec:
                    stream = self.streams[name] = Stream(codec)
                return stream.encode(x, step)

        return encode

    def reset(self) -> None:
        """Drops every stream's residual (a new session starts from zero)."""
        with self.lock:
            self.streams.clear()


def encoder_of(feedback: Feedback | None, name: str, codec: str, step: int):
    """`feedback.encoder(...)`, or None without error feedback."""
    return None if feedback is None else feedback.encoder(name, codec, step)
