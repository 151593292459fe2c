"""Admission before compute: the bytes of forward state a training step will keep, known before it runs."""

from __future__ import annotations

import torch
from torch import nn

from tandem.stages.lora import bind

from .sessions import Session


class SavedBytes:
    """Counts the bytes autograd saves for backward (activations only, not the frozen weights)."""

    def __init__(self, param_ptrs: set[int]):
        self.param_ptrs = param_ptrs
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, tensor: torch.Tensor):
        try:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in self.param_ptrs and ptr not in self.seen:
                self.seen.add(ptr)
                self.total += tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            self.total += tensor.numel() * tensor.element_size()
        # Detached: the same storage, but no link to the tensor's grad_fn. Returning it itself makes a cycle through
        # C++ (grad_fn -> saved tensor -> grad_fn) that Python's GC cannot see, so a graph whose backward never came
        # leaked.
        return tensor.detach()

    @staticmethod
    def unpack(tensor):
        return tensor


class StateModel:
    """The middle's forward state as k + b*(a*t + c*t^2) bytes for (b, t) tokens (c: attention maps, when the
    attention implementation keeps them), fitted from three tiny passes at start-up.

    Padding makes the attention keep a (batch, seq, seq) mask per block: padded passes get a second fit.
    """

    def __init__(self, middle: nn.Module, model: nn.Module, hidden_size: int, max_positions: int):
        self.middle = middle
        self.hidden_size = hidden_size
        self.max_positions = max_positions
        self.param_ptrs = {p.data_ptr() for p in model.parameters()}
        self.fit = {pad: self._calibrate(pad) for pad in (False, True)}

    def counter(self) -> SavedBytes:
        """A fresh counter of what one pass saves for backward."""
        return SavedBytes(self.param_ptrs)

    def _saved_bytes(self, b: int, t: int, pad: bool) -> int:
        """Bytes autograd keeps for one training forward of (b, t) tokens through the middle, without adapters."""
        h = torch.zeros(b, t, self.hidden_size, requires_grad=True)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[:, 0] = 0 if pad else 1
        saved = self.counter()
        with torch.enable_grad(), bind(None), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            self.middle(h, mask)
        return saved.total

    def _calibrate(self, pad: bool) -> tuple[float, float, float]:
        """(k, a, c) of the fit, from passes of (1, t1), (1, t2) and (2, t2) tokens."""
        t1, t2 = min(32, self.max_positions), min(64, self.max_positions)
        f11, f12, f22 = (self._saved_bytes(b, t, pad) for b, t in ((1, t1), (1, t2), (2, t2)))
        row2 = f22 - f12  # one row of t2 tokens
        k = max(0.0, f12 - row2)
        row1 = f11 - k
        c = max(0.0, (row2 / t2 - row1 / t1) / (t2 - t1)) if t2 > t1 else 0.0
        a = max(0.0, row1 / t1 - c * t1, row2 / t2 - c * t2)
        return k, a, c

    def estimate(self, session: Session, b: int, t: int, padded: bool = True) -> int:
        """The forward state a training forward of (b, t) tokens in `session` will keep, in bytes;
        `padded`: some row has padding (or the pass is shared, where rows are padded to a common length)."""
        k, a, c = self.fit[padded]
        per_token = 2 * self.hidden_size * 4  # the input and output kept with the graph
        for slot in session.slots:  # the LoRA path: A x (rank), and with dropout its mask and dropped-out input
            per_token += 4 * 2 * session.lora_cfg.rank + (8 * slot.in_features if session.lora_cfg.dropout > 0 else 0)
        return int(k + b * (a * t + c * t * t) + b * t * per_token)
