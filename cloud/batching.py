"""Coordinated batching: concurrent sessions' forward and backward requests share one pass of the frozen middle.

One worker thread owns the middle's compute. Request threads queue jobs and wait. Forward jobs with
the same sequence length and mode (train or eval) are concatenated along the batch dimension and
run once, with each session's remote LoRA applied to its own rows by the segmented multi-LoRA
kernel (`MultiBinding`); the backward jobs of a group's members are collected (waiting a bounded
time for the late ones) and run as one backward (the passes themselves: cloud/batch_pass.py).

Batching with a serial worker is also continuous: everything that queued while a batch was
computing forms the next batch, so clients need not be in lock-step for their requests to meet.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from tandem.stages.lora import Segment

from .batch_pass import Group, Job, backward_pass, forward_pass
from .errors import Overloaded

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


class Batcher:
    """The worker that runs batched forward and backward passes of a MiddleStage."""

    def __init__(self, middle, cfg: BatchingConfig, saved_bytes=None, sessions=None, recompute: bool = False):
        """Args:
        middle: The MiddleStage (callable as middle(h, attention_mask)).
        cfg: Batching limits.
        saved_bytes: Factory of a saved-tensor counter (pack/unpack/total) for memory accounting.
        sessions: Callable giving the number of open sessions (one open session never waits).
        recompute: Training passes keep their input, not their graph; backward passes rerun them.
        """
        self.recompute = recompute
        self.sessions = sessions
        self._idle_since = time.monotonic()  # waits count from when the worker is free, not while it computes
        self._running = False
        self.middle = middle
        self.cfg = cfg
        self.saved_bytes = saved_bytes
        self._jobs: list[Job] = []
        # (key, session) -> sessions that ran a training forward of that key since the session's last one
        self._since: dict[tuple, set[str]] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._dead = False
        self.on_death = None  # fn() called once if the worker thread dies (the server then reports NOT_SERVING)
        self.batches = 0  # batched passes started (a failed one too), for tests and metrics
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
        job = Job("forward", (h.shape[1], train), h.shape[0] * h.shape[1], (h, mask, segment), member=member)
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
        job = Job("backward", (group,), grad_out.shape[0] * grad_out.shape[1], (group, index, grad_out, then))
        return self._submit(job)

    def _submit(self, job: Job):
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
    def _pick(self) -> list[Job] | float:
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
            if not group.complete({j.args[1] for j in batch}) and now < deadline and not self._stop:
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

    def _next(self) -> list[Job] | None:
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

    def _pass(self, batch: list[Job]) -> None:
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
            # Counted before the pass hands out results: a caller holding its result sees its pass counted.
            self.batches += 1
            self.batched_requests += len(batch)
            if kind == "forward":
                forward_pass(self.middle, batch, self.saved_bytes, self.recompute)
            else:
                backward_pass(batch, self.middle)
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
