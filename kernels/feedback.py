"""Error feedback for the int8/int4 wire codecs: each sender stream carries its quantization error into its next step.

EF-SGD style, sender-side only: a stream (e.g. the client's hidden at the bottom cut) keeps the residual
r = (x + r_prev) - decode(encode(x + r_prev)) of its last step and adds it to the next step's tensor, so the
sum of what arrived over steps tracks the sum of the true tensors within one quantization step (the error
does not accumulate). The receiver decodes as usual: it keeps no state and needs no change.

The state is keyed by step: encoding a step again (a transport retry, a step redone after a lost session)
starts from the residual of the steps before it, so it sends the same bytes and leaves the same state. A
stream restarts from zero when the shape changes or the step goes backwards. Float codecs pass through.
"""

from __future__ import annotations

import threading

import torch

from . import codecs

LOSSY = ("int8", "int4")


class Stream:
    """One sender stream's residual, keyed by step (see the module docstring)."""

    def __init__(self, codec: str, block: int = codecs.DEFAULT_BLOCK):
        if codec not in codecs.CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {codecs.CODECS}")
        self.codec, self.block = codec, block
        self.base: torch.Tensor | None = None  # residual carried into `step` (from the steps before it)
        self.step: int | None = None  # the last step encoded
        self.residual: torch.Tensor | None = None  # what `step` left to carry into the next one

    @property
    def nbytes(self) -> int:
        """Bytes this stream holds (its base and its residual)."""
        return sum(t.numel() * t.element_size() for t in (self.base, self.residual) if t is not None)

    def encode(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """codecs.encode of `x` plus the carried residual; returns (values, scales) and keeps the new residual."""
        if self.codec not in LOSSY:
            return codecs.encode(x.detach(), self.codec, self.block)
        if self.step is not None and step != self.step:
            self.base = self.residual if step > self.step else None  # next step: commit; backwards: restart
        self.step = step
        y = x.detach().float()
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
        """A `tensor -> (values, scales)` encoder of stream `name` at `step`, or None where there is nothing to
        carry: a float codec (exact or half precision) or a negative step (evaluation: stateless, the plain codec)."""
        if codec not in LOSSY or step < 0:
            return None

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
