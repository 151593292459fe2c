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

import contextlib
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tandem.stages.lora import Binding, MultiBinding, Segment, bind

from .errors import Overloaded, StateEvicted

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
    pending: list[object] = field(default_factory=list)  # weak refs to each member's Pending, to tell if it still waits

    def __post_init__(self):
        self.done = [False] * len(self.sizes)
        self.pending = [None] * len(self.sizes)  # set by the service (stored()) once the member's state is stored
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def stored(self, index: int, pending) -> None:
        """Records member `index`'s Pending. Weakly: a Pending holds its Group, and a strong link back would make
        a cycle that keeps a dropped graph (tens of MB) alive until Python's cycle collector happens to run."""
        self.pending[index] = weakref.ref(pending)


@dataclass
class _Job:
    kind: str  # "forward" | "backward"
    key: tuple  # batching key: forward (T, train); backward (id of group)
    tokens: int
    args: tuple
    member: str = ""
    future: Future = field(default_factory=Future)
    t0: float = field(default_factory=time.monotonic)


class Batcher:
    """The worker that runs batched forward and backward passes of a MiddleStage."""

    def __init__(self, middle, cfg: BatchingConfig, saved_bytes=None, sessions=None):
        """Args:
        middle: The MiddleStage (callable as middle(h, attention_mask)).
        cfg: Batching limits.
        saved_bytes: Factory of a saved-tensor counter (pack/unpack/total) for memory accounting.
        sessions: Callable giving the number of open sessions (one open session never waits).
        """
        self.sessions = sessions
        self._idle_since = time.monotonic()  # waits count from when the worker is free, not while it computes
        self._running = False
        self.middle = middle
        self.cfg = cfg
        self.saved_bytes = saved_bytes
        self._jobs: list[_Job] = []
        # (key, session) -> sessions that ran a training forward of that key since the session's last one
        self._since: dict[tuple, set[str]] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._dead = False
        self.on_death = None  # fn() called once if the worker thread dies (the server then reports NOT_SERVING)
        self.batches = 0  # batched passes run, for tests and metrics
        self.batched_requests = 0
        self.compute_s = 0.0  # seconds spent in passes; over wall time, the worker's busy share
        self._thread = threading.Thread(target=self._run, name="tandem-batcher", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether requests are queued or a pass is running (a lone session then still goes through the worker)."""
        return bool(self._jobs) or self._running

    # Request side ---------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, mask: torch.Tensor, segment: Segment, train: bool, member: str = ""):
        """Queues a forward of one session's batch.

        Args:
            h, mask: The session's hidden states (b, T, H) and padding mask (b, T).
            segment: The session's adapter (slots in wire order) and dropout, for the MultiBinding.
            train: Keep the graph for backward.
            member: The session's id. A training forward waits (up to backward_wait_ms) for the sessions
                that ran between this session's last two forwards, so clients that cycle together meet.

        Returns:
            (output (b, T, H), Group or None, index in the group, compute seconds, forward-state bytes).
        """
        job = _Job("forward", (h.shape[1], train), h.shape[0] * h.shape[1], (h, mask, segment), member=member)
        return self._submit(job)

    def forget(self, member: str) -> None:
        """Drops a closed session from the groups the worker waits for."""
        with self._cv:
            for k in [k for k in self._since if k[1] == member]:
                del self._since[k]
            for seen in self._since.values():
                seen.discard(member)
            self._cv.notify_all()

    def backward(self, group: Group, index: int, grad_out: torch.Tensor, then=None):
        """Queues the backward of member `index` of `group`; returns (grad input, flat lora grads, compute seconds).

        then: optional fn(flat lora grads) -> what to return instead, run by the worker right after the pass
        (a cloud optimizer's update: on the worker's cores, not competing with it from a request thread).
        """
        job = _Job("backward", (group,), grad_out.shape[0] * grad_out.shape[1], (group, index, grad_out, then))
        return self._submit(job)

    def _submit(self, job: _Job):
        with self._cv:
            if self._stop or self._dead:
                raise Overloaded("the server is shutting down or its compute worker stopped; retry on another server")
            self._jobs.append(job)
            self._cv.notify_all()
        return job.future.result()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    # Worker side ----------------------------------------------------------------------------
    def _pick(self) -> list[_Job] | float:
        """Chooses the next batch, or returns how long to wait (s) before looking again. Holds the lock.

        Backwards go first: they free memory and unblock their clients, whose next forwards are what
        a waiting forward batch wants to meet. A backward waits (bounded) for the rest of its group.
        A training forward waits (bounded) for the sessions that ran in between its session's last
        two forwards: the clients that cycle with it. Anything else waits `window_ms`.
        """
        now = time.monotonic()
        first = next((j for j in self._jobs if j.kind == "backward"), None)
        if first is not None:
            group = first.args[0]
            batch = [j for j in self._jobs if j.kind == "backward" and j.key == first.key]
            deadline = max(first.t0, self._idle_since) + self.cfg.backward_wait_ms / 1000
            if not self._group_complete(group, batch) and now < deadline and not self._stop:
                return deadline - now
        else:
            first = self._jobs[0]
            batch, tokens = [], 0
            for j in self._jobs:  # the first job always runs, alone if it alone is over max_tokens
                if j.key == first.key and (not batch or tokens + j.tokens <= self.cfg.max_tokens):
                    batch.append(j)
                    tokens += j.tokens
            want = self._since.get((first.key, first.member), set()) if first.key[1] else set()
            full = tokens + min((j.tokens for j in batch), default=0) > self.cfg.max_tokens
            alone = self.sessions is not None and self.sessions() <= 1  # no one else could join
            wait_ms = self.cfg.backward_wait_ms if want else (0.0 if alone else self.cfg.window_ms)
            deadline = max(first.t0, self._idle_since) + wait_ms / 1000
            # With sessions to meet, wait until they are all here; without, wait out the window (others may join).
            missing = not want or not want <= {j.member for j in batch}
            if not full and missing and now < deadline and not self._stop:
                return deadline - now
            if want and now >= deadline:  # those that did not come are not waited for again by this session
                self._since[(first.key, first.member)] = {j.member for j in batch} - {first.member}
        for j in batch:
            self._jobs.remove(j)
        return batch

    def _cycled(self, key: tuple, members: set[str]) -> None:
        """Records a training forward pass of `members` at `key` (their cycles restart; the others saw them run)."""
        for (k, m), seen in self._since.items():
            if k == key and m not in members:
                seen |= members
        for m in members:
            self._since[(key, m)] = members - {m}

    def _run(self) -> None:
        try:
            while True:
                batch = self._next()
                if batch is None:
                    return
                self._pass(batch)
                batch = None  # wait for the next batch holding nothing of this one (its futures hold its graph)
        except BaseException as e:  # noqa: BLE001 - a bug in the worker itself: fail everyone, report unhealthy
            self._die(e)

    def _next(self) -> list[_Job] | None:
        """Waits for and takes the next batch (None: stopped and drained)."""
        with self._cv:
            while True:
                if not self._jobs:
                    if self._stop:
                        return None
                    self._cv.wait()
                    continue
                try:
                    batch = self._pick()
                except Exception as e:  # noqa: BLE001 - fail the oldest job (the one the pick was about), go on
                    log.error("batcher: choosing a batch failed (%s); failing the oldest request", type(e).__name__)
                    batch = [self._jobs.pop(0)]
                    batch[0].future.set_exception(e)
                    continue
                if isinstance(batch, list):
                    break
                self._cv.wait(batch)
            self._running = True
            return batch

    def _pass(self, batch: list[_Job]) -> None:
        """Runs one batch; an error fails only this batch's requests."""
        kind = batch[0].kind
        t_pass = time.perf_counter()
        try:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "batched %s: %d requests, %d tokens, oldest waited %.0f ms",
                    kind,
                    len(batch),
                    sum(j.tokens for j in batch),
                    1000 * (time.monotonic() - min(j.t0 for j in batch)),
                )
            if kind == "forward" and batch[0].key[1]:
                with self._cv:
                    self._cycled(batch[0].key, {j.member for j in batch if j.member})
            if kind == "forward":
                self._forward(batch)
            else:
                self._backward(batch)
            self.batches += 1
            self.batched_requests += len(batch)
        except Exception as e:  # noqa: BLE001 - every waiting request of this batch gets the error; the worker lives on
            log.warning("batched %s of %d requests failed: %s", kind, len(batch), type(e).__name__)
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
        finally:
            self.compute_s += time.perf_counter() - t_pass
            self._idle_since = time.monotonic()
            self._running = False

    def _die(self, e: BaseException) -> None:
        """The worker cannot go on: every queued request fails, later ones are refused, on_death reports it."""
        log.error("batcher: the worker stopped on %s; batched requests now fail", type(e).__name__)
        with self._cv:
            self._dead = True
            jobs, self._jobs = self._jobs, []
        for j in jobs:
            if not j.future.done():
                j.future.set_exception(Overloaded("the server's compute worker stopped; retry on another server"))
        if self.on_death is not None:
            self.on_death()

    @property
    def alive(self) -> bool:
        """Whether the worker thread still runs passes (false once it died or was stopped and drained)."""
        return self._thread.is_alive() and not self._dead

    @staticmethod
    def _waiting(group: Group, i: int) -> bool:
        """Whether member i of the group still waits for its backward (its forward state is still stored)."""
        if group.done[i]:
            return False
        ref = group.pending[i]
        if ref is None:  # not stored yet (it will be)
            return True
        p = ref()
        if p is None:  # dropped from the store and gone
            return False
        if p.taken:  # its backward is on its way here
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
            hooks = (
                torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack)
                if saved
                else contextlib.nullcontext()
            )
            with torch.enable_grad(), bind(binding), hooks:
                out = self.middle(h_in, am)
            loras = [[t for pair in seg.tensors.values() for t in pair] for seg in segments]  # wire order
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
            raise StateEvicted(
                "the batched forward state of this step was already released; redo the step's "
                "forward (the client does this automatically)"
            )
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
            out = torch.cat([g.reshape(-1) for g in flat]) if flat else torch.zeros(0)
            then, t1 = j.args[3], time.perf_counter()
            if then is not None:
                try:
                    out = then(out)
                except Exception as e:  # noqa: BLE001 - this member's error; the others' results stand
                    j.future.set_exception(e)
                    continue
            j.future.set_result(
                (g_in[off : off + group.sizes[i]], out, dt * j.tokens / n_tok + time.perf_counter() - t1)
            )
        if not retain:
            group.out = group.h_in = None  # free the graph even if a member's Pending lingers
