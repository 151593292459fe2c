"""Admission before compute: the bytes of forward state a training step will keep, known before it runs.

The one estimator of forward state, used by the server's admission control and by `cloud plan`:
`StateModel.estimate(mode, b, t, padded, adapter)` in bytes, for `mode` in FORWARD_STATE_MODES
(`resolve_mode` turns `auto` into one of them for a device; `recompute_bytes` needs no model at all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.stages.lora import bind

FORWARD_STATE_MODES = ("keep", "recompute")
# Recompute mode, per pending step, beside the input and mask: the Pending, Replay and Segment records and the
# tensors' headers, the adapter dict (references to LoRA tensors the session holds anyway, counted as its resident
# bytes) and a seed: a few hundred bytes of Python objects each, rounded up.
RECOMPUTE_OVERHEAD_BYTES = 4096


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """`keep` or `recompute` for `cloud serve --forward-state MODE` on `device`: auto is recompute on an
    accelerator (memory is scarce there, compute is not) and keep on the CPU (today's behaviour)."""
    if mode == "auto":
        return "keep" if torch.device(device).type in ("cpu", "meta") else "recompute"
    if mode not in FORWARD_STATE_MODES:
        raise ValueError(f"forward state mode must be one of {[*FORWARD_STATE_MODES, 'auto']}, got {mode!r}")
    return mode


def recompute_bytes(b: int, t: int, hidden_size: int, element_size: int) -> int:
    """Forward state one pending step keeps in recompute mode: the middle's input of (b, t) tokens in the
    compute dtype (`element_size` bytes a value), its uint8 mask, and RECOMPUTE_OVERHEAD_BYTES."""
    return b * t * hidden_size * element_size + b * t + RECOMPUTE_OVERHEAD_BYTES


@dataclass(frozen=True)
class AdapterShape:
    """What of a session's remote LoRA changes a keep-mode step's state: its rank, the input width of each
    adapted layer, and whether it has dropout (its mask and dropped-out input are kept too)."""

    rank: int = 0
    in_features: tuple[int, ...] = ()
    dropout: bool = False

    @classmethod
    def of(cls, session) -> AdapterShape:
        """A session's (tandem.cloud.sessions.Session)."""
        cfg = session.lora_cfg
        return cls(cfg.rank, tuple(slot.in_features for slot in session.slots), cfg.dropout > 0)


def storage_key(tensor: torch.Tensor) -> int:
    """Which storage a tensor views (the same for all its views; works on the meta device, where data_ptr is 0)."""
    return tensor.untyped_storage()._cdata


class SavedBytes:
    """Counts the bytes autograd saves for backward (activations only, not the frozen weights)."""

    def __init__(self, param_keys: set[int]):
        self.param_keys = param_keys
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, tensor: torch.Tensor):
        try:
            key = storage_key(tensor)
            if key not in self.param_keys and key not in self.seen:
                self.seen.add(key)
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
    """The middle's forward state per mode. Keep: k + b*(a*t + c*t^2) bytes for (b, t) tokens (c: attention
    maps, when the attention implementation keeps them), fitted from three tiny passes at start-up (on the
    middle's device and dtype; the meta device works, for planning without weights). Recompute: the input.

    Padding makes the attention keep a (batch, seq, seq) mask per block: padded passes get a second fit.
    """

    def __init__(self, middle: nn.Module, model: nn.Module, hidden_size: int, max_positions: int):
        self.middle = middle
        self.hidden_size = hidden_size
        self.max_positions = max_positions
        first = next(middle.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.element_size = first.element_size()  # of the compute dtype: bfloat16 state counts half of float32's
        self.param_keys = {storage_key(p) for p in model.parameters()}
        self.fit = {pad: self._calibrate(pad) for pad in (False, True)}

    def counter(self) -> SavedBytes:
        """A fresh counter of what one pass saves for backward."""
        return SavedBytes(self.param_keys)

    def _saved_bytes(self, b: int, t: int, pad: bool) -> int:
        """Bytes autograd keeps for one training forward of (b, t) tokens through the middle, without adapters."""
        h = torch.zeros(b, t, self.hidden_size, dtype=self.dtype, device=self.device, requires_grad=True)
        mask = torch.ones(b, t, dtype=torch.long, device=self.device)
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

    def keep_bytes(self, b: int, t: int, padded: bool = True, adapter: AdapterShape = AdapterShape()) -> int:
        """Keep mode: the autograd graph of a training forward of (b, t) tokens with `adapter`, in bytes;
        `padded`: some row has padding (or the pass is shared, where rows are padded to a common length)."""
        k, a, c = self.fit[padded]
        size = self.element_size
        per_token = 2 * self.hidden_size * size  # the input and output kept with the graph
        for width in adapter.in_features:  # the LoRA path: A x (rank), and with dropout its mask and dropped-out input
            per_token += size * 2 * adapter.rank + (2 * size * width if adapter.dropout else 0)
        return int(k + b * (a * t + c * t * t) + b * t * per_token)

    def estimate(self, mode: str, b: int, t: int, padded: bool = True, adapter: AdapterShape = AdapterShape()) -> int:
        """The forward state one pending training step of (b, t) tokens keeps in `mode` (keep or recompute), in
        bytes: what admission reserves before the compute runs, and what `cloud plan` reports per session."""
        if mode == "recompute":
            return recompute_bytes(b, t, self.hidden_size, self.element_size)
        if mode == "keep":
            return self.keep_bytes(b, t, padded, adapter)
        raise ValueError(f"forward state mode must be one of {list(FORWARD_STATE_MODES)}, got {mode!r}")
