"""Coordinated batching: concurrent sessions' forward and backward requests share one pass of the frozen middle.

One worker thread owns the middle's compute. Request threads queue jobs and wait. Forward jobs with
the same sequence length and mode (train or eval) are concatenated along the batch dimension and
run once, with each session's remote LoRA applied to its own rows by the segmented multi-LoRA
kernel (`MultiBinding`). A training forward keeps one autograd graph for the whole batch (a
*group*); the backward jobs of a group's members are collected (waiting a bounded time for the
late ones) and run as one backward with their output gradients concatenated. Gradients are
separable across rows, so every session gets what it would have got alone, up to float rounding.

Batching with a serial worker is also continuous: everything that queued while a batch was
computing forms the next batch, so clients need not be in lock-step for their requests to meet.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tandem.stages.lora import Binding, MultiBinding, Segment, bind

from .errors import StateEvicted

log = logging.getLogger(__name__)


@dataclass
class BatchingConfig:
    """How the cloud batches concurrent sessions.

    Attributes:
        window_ms: How long an idle worker waits for more requests to join a batch.
        max_tokens: Most tokens in one batch; a request larger than this runs alone.
        backward_wait_ms: How long a backward waits for the rest of its forward group.
    """

    window_ms: float = 5.0
    max_tokens: int = 16384
    backward_wait_ms: float = 200.0

    def __post_init__(self):
        if self.window_ms < 0 or self.backward_wait_ms < 0:
            raise ValueError("batching waits must be >= 0 ms")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(eq=False)
class Group:
    """One batched training forward: the graph from the concatenated input to the concatenated output."""

    h_in: torch.Tensor  # (B, T, H), requires grad
    out: torch.Tensor  # (B, T, H)
    sizes: list[int]  # sequences of each member, in batch order
    loras: list[list[torch.Tensor]]  # each member's remote-LoRA tensors (leaves of the graph)
    done: list[bool] = field(default_factory=list)
    pending: list[object] = field(default_factory=list)  # each member's Pending, to tell if it still waits

    def __post_init__(self):
        self.done = [False] * len(self.sizes)
        self.pending = [None] * len(self.sizes)  # set by the service once the member's state is stored
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]


@dataclass
class _Job:
    kind: str  # "forward" | "backward"
    key: tuple  # batching key: forward (T, train); backward (id of group)
    tokens: int
    args: tuple
    member: str = ""
    future: Future = field(default_factory=Future)


class Batcher:
    """The worker that runs batched forward and backward passes of a MiddleStage."""

    def __init__(self, middle, cfg: BatchingConfig, saved_bytes=None):
        """Args:
            middle: The MiddleStage (callable as middle(h, attention_mask)).
            cfg: Batching limits.
            saved_bytes: Factory of a saved-tensor counter (pack/unpack/total) for memory accounting.
        """
        self.middle = middle
        self.cfg = cfg
        self.saved_bytes = saved_bytes
        self._jobs: list[_Job] = []
        self._peers: dict[str, set[str]] = {}  # session -> the other sessions of its last training pass
        self._cv = threading.Condition()
        self._stop = False
        self.batches = 0  # batched passes run, for tests and metrics
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._run, name="tandem-batcher", daemon=True)
        self._thread.start()

    # Request side ---------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, mask: torch.Tensor, segment: Segment, lora: list[torch.Tensor], train: bool,
                member: str = ""):
        """Queues a forward of one session's batch.

        Args:
            h, mask: The session's hidden states (b, T, H) and padding mask (b, T).
            segment: The session's adapter and dropout, for the MultiBinding.
            lora: The session's remote-LoRA tensors in wire order [A0, B0, A1, B1, ...].
            train: Keep the graph for backward.
            member: The session's id. Training sessions that shared a pass tend to stay in step, so the
                worker waits (up to backward_wait_ms) for the other members of a session's last group.

        Returns:
            (output (b, T, H), Group or None, index in the group, compute seconds, forward-state bytes).
        """
        job = _Job("forward", (h.shape[1], train), h.shape[0] * h.shape[1], (h, mask, segment, lora), member=member)
        return self._submit(job)

    def forget(self, member: str) -> None:
        """Drops a closed session from the groups the worker waits for."""
        with self._cv:
            self._peers.pop(member, None)
            for peers in self._peers.values():
                peers.discard(member)

    def backward(self, group: Group, index: int, grad_out: torch.Tensor):
        """Queues the backward of member `index` of `group`; returns (grad input, flat lora grads, compute seconds)."""
        job = _Job("backward", (group,), grad_out.shape[0] * grad_out.shape[1], (group, index, grad_out))
        return self._submit(job)

    def _submit(self, job: _Job):
        with self._cv:
            if self._stop:
                raise RuntimeError("the batcher has stopped")
            self._jobs.append(job)
            self._cv.notify_all()
        return job.future.result()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    # Worker side ----------------------------------------------------------------------------
    def _take(self, first: _Job, deadline: float, complete=None) -> list[_Job]:
        """Pops `first` and every queued job with its key (within max_tokens), waiting until `deadline`.

        Returns early when `complete(batch)` says the batch cannot grow any more.
        """
        batch, tokens = [first], first.tokens
        self._jobs.remove(first)
        while True:
            for j in [j for j in self._jobs if j.key == first.key and j.kind == first.kind]:
                if tokens + j.tokens > self.cfg.max_tokens:
                    continue
                self._jobs.remove(j)
                batch.append(j)
                tokens += j.tokens
            if complete is not None and complete(batch):
                return batch
            left = deadline - time.monotonic()
            if left <= 0 or self._stop:
                return batch
            self._cv.wait(left)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop and not self._jobs:
                    return
                first = self._jobs[0]
                if first.kind == "forward":
                    peers = self._peers.get(first.member) if first.member and first.key[1] else None
                    if peers:  # its last group is likely on its way: wait for it, within the bound
                        batch = self._take(first, time.monotonic() + self.cfg.backward_wait_ms / 1000,
                                           complete=lambda b, want=frozenset(peers): want <= {j.member for j in b})
                        self._regroup(first.member, peers, batch)
                    else:
                        batch = self._take(first, time.monotonic() + self.cfg.window_ms / 1000)
                else:
                    group = first.args[0]
                    batch = self._take(first, time.monotonic() + self.cfg.backward_wait_ms / 1000,
                                       complete=lambda b, g=group: self._group_complete(g, b))
            try:
                if first.kind == "forward":
                    self._forward(batch)
                else:
                    self._backward(batch)
                self.batches += 1
                self.batched_requests += len(batch)
            except BaseException as e:  # every waiting request gets the error; the worker lives on
                log.warning("batched %s of %d requests failed: %s", first.kind, len(batch), type(e).__name__)
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)

    def _regroup(self, member: str, peers: set[str], batch: list[_Job]) -> None:
        """Peers that did not come in time are not waited for again (until they share a pass again)."""
        came = {j.member for j in batch}
        for p in peers - came:
            peers.discard(p)
            if p in self._peers:
                self._peers[p].discard(member)

    @staticmethod
    def _waiting(group: Group, i: int) -> bool:
        """Whether member i of the group still waits for its backward (its forward state is still stored)."""
        if group.done[i]:
            return False
        p = group.pending[i]
        if p is None:  # forward returned but the state is not stored yet: it will be
            return True
        return any(q is p for q in list(p.session.pending.values()))

    def _group_complete(self, group: Group, batch: list[_Job]) -> bool:
        have = {j.args[1] for j in batch}
        return all(i in have or not self._waiting(group, i) for i in range(len(group.sizes)))

    def _forward(self, batch: list[_Job]) -> None:
        train = batch[0].key[1]
        h = torch.cat([j.args[0] for j in batch]) if len(batch) > 1 else batch[0].args[0]
        mask = torch.cat([j.args[1] for j in batch]) if len(batch) > 1 else batch[0].args[1]
        segments = [j.args[2] for j in batch]
        if len(segments) == 1:  # alone: the plain path, bit for bit what an unbatched server computes
            seg = segments[0]
            binding = Binding(seg.tensors, seg.scaling, seg.dropout, seg.generator)
        else:
            binding = MultiBinding(segments)
        am = mask.to(torch.long)
        t0 = time.perf_counter()
        if train:
            h_in = h.detach().requires_grad_(True)
            saved = self.saved_bytes() if self.saved_bytes else None
            hooks = (torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack) if saved
                     else _nullcontext())
            with torch.enable_grad(), bind(binding), hooks:
                out = self.middle(h_in, am)
            loras = [j.args[3] for j in batch]
            members = {j.member for j in batch if j.member}
            if len(members) > 1:
                with self._cv:
                    for m in members:
                        self._peers[m] = members - {m}
            group = Group(h_in, out, [s.size for s in segments], loras)
            total = (saved.total if saved else 0) + h.nbytes + out.nbytes
        else:
            with torch.no_grad(), bind(binding):
                out = self.middle(h, am)
            group, total = None, 0
        dt = time.perf_counter() - t0
        n_tok = sum(j.tokens for j in batch)
        at = 0
        for i, j in enumerate(batch):
            n = j.args[0].shape[0]
            share = j.tokens / n_tok
            j.future.set_result((out[at : at + n].detach(), group, i, dt * share, int(total * share)))
            at += n

    def _backward(self, batch: list[_Job]) -> None:
        group: Group = batch[0].args[0]
        if group.out is None:
            raise StateEvicted("the batched forward state of this step was already released; redo the step's "
                               "forward (the client does this automatically)")
        by_index = {j.args[1]: j for j in batch}
        grad = torch.zeros_like(group.out)
        for i, j in by_index.items():
            off = group.offsets[i]
            grad[off : off + group.sizes[i]] = j.args[2]
        for i in by_index:
            group.done[i] = True
        retain = any(self._waiting(group, i) for i in range(len(group.sizes)))
        wanted = [t for i in by_index for t in group.loras[i]]
        t0 = time.perf_counter()
        grads = torch.autograd.grad(group.out, [group.h_in, *wanted], grad, retain_graph=retain, allow_unused=True)
        dt = time.perf_counter() - t0
        g_in, rest = grads[0], list(grads[1:])
        n_tok = sum(j.tokens for j in batch)
        for i, j in by_index.items():
            k = len(group.loras[i])
            mine, rest = rest[:k], rest[k:]
            flat = [g if g is not None else torch.zeros_like(t) for g, t in zip(mine, group.loras[i])]
            off = group.offsets[i]
            j.future.set_result((g_in[off : off + group.sizes[i]],
                                 torch.cat([g.reshape(-1) for g in flat]) if flat else torch.zeros(0),
                                 dt * j.tokens / n_tok))
        if not retain:
            group.out = group.h_in = None  # free the graph even if a member's Pending lingers


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
