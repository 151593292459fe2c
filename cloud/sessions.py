"""Per-session state in the cloud: a bounded, expiring store of what backward needs."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from tandem.stages.lora import LoraConfig, SlotSpec

from .allocator import return_freed_memory
from .errors import NotOwner, Overloaded, SessionNotFound, StateEvicted, StepNotPending, TooLarge


@dataclass
class StoreConfig:
    """Limits of the session store.

    Attributes:
        max_sessions: Open sessions at once; more get RESOURCE_EXHAUSTED.
        memory_bytes: Cap on memory held for sessions, over all of them: forward state kept for backward, and
            each session's remote LoRA (with a cloud optimizer, its AdamW moments too).
        ttl_s: A session idle this long is closed and its memory freed.
    """

    max_sessions: int = 64
    memory_bytes: int = 8 * 1024**3
    ttl_s: float = 600.0
    max_sessions_per_identity: int = 8  # 0: no per-identity limit
    max_cache_tokens: int = 4096  # generation sessions: cached positions (batch x length) each, counted in the cap

    def __post_init__(self):
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1, got {self.memory_bytes}")
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")
        if self.max_cache_tokens < 1:
            raise ValueError(f"--max-cache-tokens must be >= 1, got {self.max_cache_tokens}")
        if self.max_sessions_per_identity < 0:  # a negative quota would refuse every session
            raise ValueError(
                f"--quota-sessions must be >= 0 (0 = no per-identity limit), got {self.max_sessions_per_identity}"
            )


@dataclass
class Pending:
    """What backward of one step needs: the autograd graph from input to output (keep mode), or what reruns the
    forward (recompute mode: `replay`; `h_in` and `out` are then None)."""

    h_in: torch.Tensor | None
    out: torch.Tensor | None
    lora: list[torch.Tensor]
    nbytes: int
    group: object = None  # tandem.cloud.batch_pass.Group when the forward ran in a batch; h_in is then None
    index: int = 0  # this session's place in the group
    session: object = None  # the Session (the batcher checks whether this state still waits)
    taken: bool = False  # taken from the store by a backward request that has not reached the batcher yet
    replay: object = None  # tandem.cloud.recompute.Replay of a forward run alone in recompute mode
    out_shape: tuple[int, ...] = ()  # the forward's output shape (what a grad_output must have)

    def __post_init__(self):
        if not self.out_shape:
            self.out_shape = tuple(self.out.shape) if self.out is not None else self.replay.shape


@dataclass
class Session:
    """One data owner's session. The remote LoRA lives only here, in memory, and dies with it."""

    id: str
    owner: str
    lora_cfg: LoraConfig
    slots: list[SlotSpec]
    remote_lora: bool
    codec: str
    gradient_codec: str = "float32"
    lora_codec: str = "float32"
    sealer: object = None  # tandem.protos.sealing.Sealer when the client asked for sealing
    opt_spec: object = None  # tandem.cloud.optimizer.AdamWSpec: the cloud applies the remote LoRA's updates
    kill_revive: bool = False  # Forward may name the live remote slots (cloud/remote_lora.py parse_live)
    generation: object = None  # tandem.cloud.generation.GenerationState of a generation session (its KV cache)
    feedback: object = None  # tandem.kernels.feedback.Feedback: error feedback of this session's sender streams
    feedback_held: int = 0  # bytes of it counted in `resident`
    optimizer: object = None  # its RemoteOptimizer, made when the first LoRA arrives
    last_used: float = field(default_factory=time.monotonic)
    lora_version: int = -1
    lora: list[torch.Tensor] = field(default_factory=list)
    resident: int = 0  # bytes the session holds for its life (remote LoRA, AdamW moments), counted in the cap
    pending: dict[int, Pending] = field(default_factory=dict)
    evicted: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionStore:
    """In-memory sessions with a memory cap on pending forward state, LRU eviction and a TTL."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        self._sessions: dict[str, Session] = {}
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()  # (session, step) -> bytes
        self._used = 0
        self._resident = 0  # sessions' resident bytes, together
        # Estimated state of admitted training forwards still computing, (session, step) -> bytes: concurrent
        # forwards must not each be admitted against the same free memory.
        self._in_flight: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def resident_bytes(self) -> int:
        return self._resident

    def open(
        self,
        owner: str,
        lora_cfg: LoraConfig,
        slots: list[SlotSpec],
        remote_lora: bool,
        codec: str,
        gradient_codec: str = "float32",
        sid: str | None = None,
        resident: int = 0,
    ) -> Session:
        """Opens a session that will hold `resident` bytes for its life (counted in the memory cap from now)."""
        self.expire()
        cap = self.cfg.memory_bytes
        if resident > cap:
            raise TooLarge(
                f"this session's remote LoRA needs {resident / 2**20:.2f} MiB, over the server's cap of "
                f"{cap / 2**20:.2f} MiB; use a smaller --rank or fewer target modules"
            )
        with self._lock:
            if len(self._sessions) >= self.cfg.max_sessions:
                raise Overloaded(f"the server holds its maximum of {self.cfg.max_sessions} sessions; retry later")
            quota = self.cfg.max_sessions_per_identity
            if quota and sum(1 for x in self._sessions.values() if x.owner == owner) >= quota:
                raise Overloaded(
                    f"identity {owner!r} already holds its quota of {quota} sessions; close one or retry later"
                )
            self._evict(resident)
            if self._used + self._resident + self._reserved() + resident > cap:
                raise Overloaded(
                    f"the server's memory cap ({cap / 2**20:.2f} MiB) is held by other sessions' adapters; "
                    "retry later or use a smaller --rank"
                )
            sid = sid or secrets.token_urlsafe(16)
            s = Session(sid, owner, lora_cfg, slots, remote_lora, codec, gradient_codec, resident=resident)
            self._sessions[sid] = s
            self._resident += resident
            return s

    def _check_open(self, s: Session) -> None:
        """Refuses to count anything for a session closed while its request ran (the lock is held): what it counted
        would never be given back."""
        if self._sessions.get(s.id) is not s:
            raise SessionNotFound(f"session {s.id[:8]}... was closed while this request ran; open a new session")

    def hold(self, s: Session, nbytes: int) -> None:
        """Counts `nbytes` more as held by `s` for its life (a generation session's KV cache), under the cap."""
        cap = self.cfg.memory_bytes
        if s.resident + nbytes > cap:
            raise TooLarge(
                f"this session would hold {(s.resident + nbytes) / 2**20:.2f} MiB, over the server's cap of "
                f"{cap / 2**20:.2f} MiB; ask the operator for a smaller --max-cache-tokens"
            )
        with self._lock:
            self._check_open(s)
            self._evict(nbytes)
            if self._used + self._resident + self._reserved() + nbytes > cap:
                raise Overloaded(
                    f"the server's memory cap ({cap / 2**20:.2f} MiB) is held by other sessions; retry later"
                )
            s.resident += nbytes
            self._resident += nbytes

    def get(self, sid: str, owner: str) -> Session:
        """Returns the caller's session; NotOwner when another identity opened it."""
        with self._lock:
            s = self._sessions.get(sid)
        if s is not None and time.monotonic() - s.last_used > self.cfg.ttl_s:
            self._drop(s)  # idle past its TTL: expired even if the periodic reaper has not run yet
            s = None
        if s is None:
            raise SessionNotFound(
                f"session {sid[:8]}... does not exist (closed, expired after {self.cfg.ttl_s:g} s idle, "
                "or the server restarted); open a new session"
            )
        if s.owner != owner:
            raise NotOwner("this session belongs to another identity")
        s.last_used = time.monotonic()
        return s

    def close(self, s: Session) -> None:
        """Closes a session the caller looked up with `get` (a session already gone stays gone)."""
        self._drop(s)
        return_freed_memory()

    def _drop(self, s: Session) -> None:
        with self._lock:
            if self._sessions.pop(s.id, None) is not None:
                self._resident -= s.resident
            for step in list(s.pending):
                self._release(s, step)
            s.lora = []
            s.optimizer = None
            s.generation = None  # the KV cache dies with the session
            s.feedback = None  # so do the error-feedback residuals

    def expire(self) -> int:
        """Closes sessions idle longer than the TTL; returns how many."""
        now = time.monotonic()
        with self._lock:
            old = [s for s in self._sessions.values() if now - s.last_used > self.cfg.ttl_s]
        for s in old:
            self._drop(s)
        if old:
            return_freed_memory()
        return len(old)

    # Pending forward state -------------------------------------------------------------------
    def _too_large(self, nbytes: int, what: str) -> TooLarge:
        cap, res = self.cfg.memory_bytes, self._resident
        held = f" ({res / 2**20:.2f} MiB of it held by sessions' adapters)" if res else ""
        return TooLarge(
            f"one step needs {what}{nbytes / 2**20:.2f} MiB of forward state, over the server's cap of "
            f"{cap / 2**20:.2f} MiB{held}; use a smaller --batch-size or --seq-len"
        )

    def admit(self, s: Session, step: int, nbytes: int) -> None:
        """Before a training forward runs: refuses one whose estimated state (`nbytes`) can never fit, evicts
        least recently used state (and this session's older steps) so that it will, and reserves it until `put`
        stores the real state or `unreserve` gives it back. Forwards still computing hold their reservations:
        when they leave no room, this one is refused as overloaded (retryable)."""
        cap = self.cfg.memory_bytes
        if nbytes > cap - self._resident:
            raise self._too_large(nbytes, "an estimated ")
        with self._lock:
            self._check_open(s)
            for old in [k for k in s.pending if k <= step]:  # the client moved on (or retries this step)
                self._release(s, old)
            self._in_flight.pop((s.id, step), None)  # a retry of this very step replaces its reservation
            self._evict(nbytes)
            if self._used + self._resident + self._reserved() + nbytes > cap:
                raise Overloaded(f"forwards in flight hold the server's memory cap ({cap / 2**20:.2f} MiB); retry")
            self._in_flight[(s.id, step)] = nbytes

    def unreserve(self, s: Session, step: int) -> None:
        """Gives back what `admit` reserved for a forward that stored nothing (it failed); no-op after `put`."""
        with self._lock:
            self._in_flight.pop((s.id, step), None)

    def _reserved(self) -> int:
        return sum(self._in_flight.values())

    def _evict(self, nbytes: int) -> None:
        """Drops least recently used forward state until `nbytes` more fit under the cap (or none is left). Holds the lock."""
        while self._used + self._resident + self._reserved() + nbytes > self.cfg.memory_bytes and self._lru:
            (sid, old_step), _ = next(iter(self._lru.items()))
            victim = self._sessions.get(sid)
            if victim is None:  # an orphan (its session is gone): still counted, so give it back
                self._used -= self._lru.pop((sid, old_step))
                continue
            self._release(victim, old_step)
            victim.evicted.add(old_step)

    def put(self, s: Session, step: int, p: Pending) -> None:
        """Stores forward state for `step`, evicting least recently used state of any session."""
        if p.nbytes > self.cfg.memory_bytes - self._resident:
            raise self._too_large(p.nbytes, "")
        p.taken = False
        with self._lock:
            self._in_flight.pop((s.id, step), None)  # the estimate gives way to the real state
            self._check_open(s)
            for old in [k for k in s.pending if k <= step]:  # the client moved on (or retries this step)
                self._release(s, old)
            self._evict(p.nbytes)
            s.pending[step] = p
            s.evicted.discard(step)
            self._lru[(s.id, step)] = p.nbytes
            self._used += p.nbytes

    def take(self, s: Session, step: int) -> Pending:
        """Removes and returns the forward state of `step`."""
        with self._lock:
            if step in s.pending:
                p = s.pending[step]
                p.taken = True  # before the release: whoever sees it gone from the store also sees this
                self._release(s, step)
                return p
            if step in s.evicted:
                s.evicted.discard(step)
                raise StateEvicted(
                    f"the forward state of step {step} was evicted to stay under the server's memory cap; "
                    "redo the step's forward (the client does this automatically)"
                )
        raise StepNotPending(f"no forward of step {step} is pending in this session; run forward with train=true first")

    def _release(self, s: Session, step: int) -> None:
        p = s.pending.pop(step, None)
        n = self._lru.pop((s.id, step), None)
        if p is not None and n is not None:
            self._used -= n
