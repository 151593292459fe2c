"""One batched pass of the middle: sessions' rows concatenated, run with each one's LoRA, results split back.

A training forward keeps one autograd graph for the whole batch (a `Group`); its members' backwards run
as one backward with their output gradients concatenated. Gradients are separable across rows, so every
session gets what it would have got alone, up to float rounding. In recompute mode the group keeps the
batch's input instead of its graph, and each backward pass reruns the whole batch's forward first (the
same pass, bit for bit), so its transient graph is at most --batch-max-tokens tokens of one pass.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tandem.stages.lora import Binding, MultiBinding, bind

from .errors import StateEvicted
from .recompute import Replay


@dataclass(eq=False)
class Group:
    """One batched training forward: the graph from the concatenated input to the concatenated output."""

    h_in: torch.Tensor | None  # (B, T, H), requires grad (keep mode)
    out: torch.Tensor | None  # (B, T, H) (keep mode)
    sizes: list[int]  # sequences of each member, in batch order
    loras: list[list[torch.Tensor]]  # each member's remote-LoRA tensors (leaves of the graph)
    done: list[bool] = field(default_factory=list)
    pending: list[object] = field(default_factory=list)  # weak refs to each member's Pending, to tell if it still waits
    replay: Replay | None = None  # recompute mode: what reruns the pass (h_in and out are then None)

    def __post_init__(self):
        self.done = [False] * len(self.sizes)
        self.pending = [None] * len(self.sizes)  # set by the service (stored()) once the member's state is stored
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def stored(self, index: int, pending) -> None:
        """Records member `index`'s Pending. Weakly: a Pending holds its Group, and a strong link back would make
        a cycle that keeps a dropped graph (tens of MB) alive until Python's cycle collector happens to run."""
        self.pending[index] = weakref.ref(pending)

    def waiting(self, i: int) -> bool:
        """Whether member i still waits for its backward (its forward state is still stored)."""
        if self.done[i]:
            return False
        ref = self.pending[i]
        if ref is None:  # not stored yet (it will be)
            return True
        pending = ref()
        if pending is None:  # dropped from the store and gone
            return False
        if pending.taken:  # its backward is on its way here
            return True
        return any(q is pending for q in list(pending.session.pending.values()))

    @property
    def released(self) -> bool:
        """Whether the group's state is gone (every member's backward ran, or none waits any more)."""
        return self.out is None and self.replay is None

    def complete(self, members: set[int]) -> bool:
        """Whether every member that still waits is among `members` (the group's backward can run)."""
        return all(i in members or not self.waiting(i) for i in range(len(self.sizes)))


@dataclass
class Job:
    """One request queued for the worker: a session's forward, or a group member's backward."""

    kind: str  # "forward" | "backward"
    key: tuple  # batching key: forward (T, train); backward (id of group)
    tokens: int
    args: tuple  # forward: (h, mask, segment); backward: (group, index, grad_out, then)
    member: str = ""
    future: Future = field(default_factory=Future)
    t0: float = field(default_factory=time.monotonic)


def forward_pass(middle, batch: list[Job], saved_bytes=None, recompute: bool = False) -> None:
    """Runs the batch's forwards as one pass of `middle`; each job's future gets
    (its rows of the output, Group or None, its index, its share of the seconds and of the state bytes).
    recompute: a training pass keeps only what reruns it (cloud/recompute.py), not its graph."""
    train = batch[0].key[1]
    h = torch.cat([j.args[0] for j in batch]) if len(batch) > 1 else batch[0].args[0]
    mask = torch.cat([j.args[1] for j in batch]) if len(batch) > 1 else batch[0].args[1]
    segments = [j.args[2] for j in batch]
    if len(segments) == 1:  # alone: the plain path, bit for bit what an unbatched server computes
        seg = segments[0]
        binding = Binding(seg.tensors, seg.scaling, seg.dropout, seg.generator)
    else:
        binding = MultiBinding(segments)
    attention_mask = mask.to(torch.long)
    start = time.perf_counter()
    if train and recompute:
        replay = Replay.of(h, mask, segments)
        with torch.no_grad(), bind(binding):
            out = middle(h, attention_mask)
        group = Group(None, None, [s.size for s in segments], _loras(segments), replay=replay)
        total = replay.nbytes()
    elif train:
        h_in = h.detach().requires_grad_(True)
        saved = saved_bytes() if saved_bytes else None
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack) if saved else contextlib.nullcontext()
        )
        with torch.enable_grad(), bind(binding), hooks:
            out = middle(h_in, attention_mask)
        group = Group(h_in, out, [s.size for s in segments], _loras(segments))
        total = (saved.total if saved else 0) + h.nbytes + out.nbytes
    else:
        with torch.no_grad(), bind(binding):
            out = middle(h, attention_mask)
        group, total = None, 0
    seconds = time.perf_counter() - start
    n_tok = sum(j.tokens for j in batch)
    at = 0
    for i, j in enumerate(batch):
        n = j.args[0].shape[0]
        share = j.tokens / n_tok
        nbytes = group.replay.nbytes(n) if group is not None and group.replay is not None else int(total * share)
        j.future.set_result((out[at : at + n].detach(), group, i, seconds * share, nbytes))
        at += n


def _loras(segments) -> list[list[torch.Tensor]]:
    """Each segment's remote-LoRA tensors, in wire order."""
    return [[t for pair in seg.tensors.values() for t in pair] for seg in segments]


def backward_pass(batch: list[Job], middle=None) -> None:
    """Runs the backwards of one group's members as one; each job's future gets (its rows of the input
    gradient, its flat LoRA gradients (or what its `then` made of them), its share of the seconds).
    middle: reruns a recompute-mode group's forward."""
    group: Group = batch[0].args[0]
    if group.released:
        raise StateEvicted(
            "the batched forward state of this step was already released; redo the step's "
            "forward (the client does this automatically)"
        )
    by_index = {j.args[1]: j for j in batch}
    start = time.perf_counter()
    h_in, out = group.replay.rerun(middle) if group.replay is not None else (group.h_in, group.out)
    grad = torch.zeros_like(out)
    for i, j in by_index.items():
        off = group.offsets[i]
        grad[off : off + group.sizes[i]] = j.args[2]
    for i in by_index:
        group.done[i] = True
    retain = any(group.waiting(i) for i in range(len(group.sizes)))
    # Kill-and-Revive: a killed slot's tensors are detached (no gradient is computed, none goes back).
    trained = {i: [t for t in group.loras[i] if t.requires_grad] for i in by_index}
    wanted = [t for i in by_index for t in trained[i]]
    keep_graph = retain and group.replay is None  # a rerun graph is never kept: the next backward reruns it again
    grads = torch.autograd.grad(out, [h_in, *wanted], grad, retain_graph=keep_graph, allow_unused=True)
    h_in = out = None
    seconds = time.perf_counter() - start
    g_in, rest = grads[0], list(grads[1:])
    n_tok = sum(j.tokens for j in batch)
    for i, j in by_index.items():
        k = len(trained[i])
        mine, rest = rest[:k], rest[k:]
        flat = [g if g is not None else torch.zeros_like(t) for g, t in zip(mine, trained[i])]
        off = group.offsets[i]
        out = torch.cat([g.reshape(-1) for g in flat]) if flat else torch.zeros(0)
        then, t1 = j.args[3], time.perf_counter()
        if then is not None:
            try:
                out = then(out)
            except Exception as e:  # noqa: BLE001 - this member's error; the others' results stand
                j.future.set_exception(e)
                continue
        j.future.set_result(
            (g_in[off : off + group.sizes[i]], out, seconds * j.tokens / n_tok + time.perf_counter() - t1)
        )
    if not retain:
        group.out = group.h_in = group.replay = None  # free the state even if a member's Pending lingers
