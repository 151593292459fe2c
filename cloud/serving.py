"""Serving tuned adapters: text generation over the one frozen model, requests for many adapters batched together."""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from tandem.stages.adapter_files import CLIENT_BLOCKS
from tandem.stages.arch import parts_of
from tandem.stages.loading import LoadedModel
from tandem.stages.lora import LoRASlot, MultiBinding, Segment, bind, inject_slots, load_peft_tensors

from .errors import CloudError, InvalidRequest, Overloaded
from .offsite import OffsiteService

log = logging.getLogger(__name__)

_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")  # keys as load_peft_tensors returns them


class AdapterNotFound(CloudError):
    """No adapter of the requested name is registered."""

    reason = "no-adapter"


class NotServable(CloudError):
    """The adapter is registered but cannot be applied over the shared frozen model."""

    reason = "not-servable"


class ServingClosed(CloudError):
    """The server is shutting down; the request was not decoded."""

    reason = "closed"


@dataclass
class ServingConfig:
    """How `cloud serve` batches and bounds Generate requests.

    Attributes:
        window_ms: After the first waiting request, how long to collect more before decoding them as one batch.
        max_batch: Most sequences (prompts, over all requests) decoded in one batch; also the most prompts per request.
        max_new_tokens: Cap on generated tokens per prompt, whatever a request asks.
        default_new_tokens: Generated tokens per prompt when a request leaves max_new_tokens at 0.
        adapter_cache: Adapters kept loaded in memory (least recently used are dropped and reloaded on demand).
        max_queued: Requests waiting for a batch before new ones are refused as overloaded.
    """

    window_ms: float = 10.0
    max_batch: int = 32
    max_new_tokens: int = 256
    default_new_tokens: int = 64
    adapter_cache: int = 16
    max_queued: int = 256

    def __post_init__(self):
        if not 0 <= self.window_ms <= 10_000:
            raise ValueError(f"window_ms must be in [0, 10000], got {self.window_ms}")
        for name in ("max_batch", "max_new_tokens", "adapter_cache", "max_queued"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"default_new_tokens must be in [1, max_new_tokens={self.max_new_tokens}], got {self.default_new_tokens}"
            )


@dataclass(frozen=True)
class ServedAdapter:
    """A registered adapter loaded for serving: LoRA (A (r, in), B (out, r)) by slot name, and alpha / r."""

    name: str
    sha256: str
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float


@dataclass
class DecodeJob:
    """One request's share of a batch.

    Attributes:
        adapter: The adapter of all its prompts, or None for the base model.
        prompts: Token ids of each prompt (non-empty).
        max_new_tokens: Tokens to generate per prompt at most.
        temperature: 0 for greedy; else sampling from softmax(logits / temperature).
        seed: Seed of the request's own sampling generator (its draws do not depend on the batch).
    """

    adapter: ServedAdapter | None
    prompts: list[list[int]]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0

    @property
    def key(self) -> str:
        return "" if self.adapter is None else self.adapter.sha256


@dataclass
class Completion:
    """One prompt's result."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" or "length"


@dataclass
class Generation:
    """One request's results, and how many sequences its batch decoded."""

    completions: list[Completion]
    adapter: str
    batch_sequences: int


@dataclass
class _Pending:
    job: DecodeJob
    adapter_name: str
    future: Future = field(default_factory=Future)


def wrap_all_blocks(model: nn.Module) -> set[str]:
    """Puts a LoRASlot on every Linear / GPT-2 Conv1D of every block (keeping slots already there); returns all slot names.

    An unbound slot adds nothing, so the model computes exactly what it did before.
    """
    parts = parts_of(model)
    for i, block in enumerate(parts.blocks):
        leaves = {
            path.rsplit(".", 1)[-1]
            for path, m in block.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not path.endswith("base_layer")
        }
        if leaves:
            inject_slots(nn.ModuleList([block]), parts.arch, [i], tuple(sorted(leaves)))
    return {m.slot_name for m in model.modules() if isinstance(m, LoRASlot)}


def load_served(name: str, sha256: str, directory: str, slots: set[str]) -> ServedAdapter:
    """Reads a registered peft LoRA directory for serving.

    Raises:
        NotServable: the adapter retuned whole blocks, uses a LoRA variant other than plain LoRA,
            or adapts a layer outside the blocks.
    """
    if os.path.exists(os.path.join(directory, CLIENT_BLOCKS)):
        raise NotServable(
            f"adapter {name!r} also retunes whole client blocks ({CLIENT_BLOCKS}); serving shares one frozen "
            "model, so only LoRA adapters can be served: tune without --tune-client-blocks and push again"
        )
    cfg, raw = load_peft_tensors(directory)
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise NotServable(
            f"adapter {name!r} uses DoRA or per-module ranks/alphas; serving supports plain LoRA with one r and alpha"
        )
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _KEY.fullmatch(key)
        if m is None or m.group(1) not in slots:
            raise NotServable(
                f"adapter {name!r} adapts {key!r}, which is not a layer inside the model's blocks; "
                "serving applies LoRA to block layers only"
            )
        pairs.setdefault(m.group(1), {})[m.group(2)] = t.float()
    tensors = {}
    for slot, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise NotServable(
                f"adapter {name!r} has lora_{next(iter(ab))} but not its pair for {slot!r}; push a complete adapter"
            )
        tensors[slot] = (ab["A"], ab["B"])
    return ServedAdapter(name, sha256, tensors, scaling)


@torch.no_grad()
def decode(
    model: nn.Module, jobs: list[DecodeJob], pad_id: int, eos_ids: set[int], impl: str = "auto"
) -> list[list[tuple[list[int], str]]]:
    """Generates for all jobs in one batch; returns, per job and prompt, (new token ids, finish reason).

    The prompts are left-padded into one batch; jobs of one adapter sit next to each other and
    form one Segment of a MultiBinding, so every LoRA slot applies all adapters in one pass
    (rows of base-model jobs get no delta). Positions count real tokens only, so a row computes
    what it would alone, up to float rounding. Each job samples from its own generator in its
    own row order, so sampling does not depend on the batch either.
    """
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].key)  # stable: same adapter -> adjacent
    segments: list[Segment] = []
    rows: list[tuple[int, int]] = []  # (job, prompt) of each batch row
    first_row: dict[int, int] = {}
    prev = None
    for i in order:
        j = jobs[i]
        if segments and j.key == prev:
            segments[-1].size += len(j.prompts)
        else:
            tensors, scaling = ({}, 1.0) if j.adapter is None else (j.adapter.tensors, j.adapter.scaling)
            segments.append(Segment(len(j.prompts), tensors, scaling))
        prev = j.key
        first_row[i] = len(rows)
        rows += [(i, k) for k in range(len(j.prompts))]
    b, t = len(rows), max(len(p) for j in jobs for p in j.prompts)
    ids = torch.full((b, t), pad_id, dtype=torch.long)  # (B, T), left-padded
    mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
    for r, (i, k) in enumerate(rows):
        p = jobs[i].prompts[k]
        ids[r, t - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, t - len(p) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T) position of each real token
    limit = [jobs[i].max_new_tokens for i, _ in rows]
    gens = {i: torch.Generator().manual_seed(j.seed) for i, j in enumerate(jobs) if j.temperature > 0}
    out_ids: list[list[int]] = [[] for _ in rows]
    reason = ["length"] * b
    done = [False] * b
    with bind(MultiBinding(segments, impl=impl)):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        for _ in range(max(limit)):
            logits = out.logits[:, -1, :].float()  # (B, V)
            nxt = logits.argmax(dim=-1)  # (B,)
            for i, g in gens.items():
                lo = first_row[i]
                hi = lo + len(jobs[i].prompts)
                if not all(done[lo:hi]):
                    probs = torch.softmax(logits[lo:hi] / jobs[i].temperature, dim=-1)  # (n_i, V)
                    nxt[lo:hi] = torch.multinomial(probs, 1, generator=g).squeeze(1)
            for r, tok in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if tok in eos_ids:
                    done[r], reason[r] = True, "eos"
                else:
                    out_ids[r].append(tok)
                    done[r] = len(out_ids[r]) >= limit[r]
            if all(done):
                break
            feed = torch.where(torch.tensor(done), torch.tensor(pad_id), nxt)  # (B,) finished rows idle on padding
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)  # (B, T + s)
            pos = pos[:, -1:] + 1  # (B, 1)
            out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
    results: list[list[tuple[list[int], str]]] = [[] for _ in jobs]
    for r, (i, _) in enumerate(rows):
        results[i].append((out_ids[r], reason[r]))
    return results


class GenerationService:
    """Generates text for requests that name a registered adapter; knows nothing of gRPC.

    Requests wait in a queue. A worker thread takes the first, collects more for up to
    `window_ms` (or until `max_batch` sequences), and decodes them all as one batch with
    `decode`; a request never splits across batches. Construct it after BackboneService: it
    adds LoRA slots to the blocks the split service leaves bare (unbound slots change nothing).

    Args:
        loaded: The served model (its tokenizer is read from its directory).
        offsite: The adapter registry (`client push`).
        cfg: Batching and limits.
    """

    def __init__(
        self, loaded: LoadedModel, offsite: OffsiteService, cfg: ServingConfig | None = None, impl: str = "auto"
    ):
        from tandem.stages.loading import load_tokenizer

        self.cfg = cfg or ServingConfig()
        self.model = loaded.model
        self.offsite = offsite
        self.impl = impl
        self.slots = wrap_all_blocks(self.model)
        self.tokenizer = load_tokenizer(loaded.path)  # the ids the data owner tuned on, in every mode
        self._tok_lock = threading.Lock()  # a fast tokenizer must not be used from two threads at once
        config = loaded.config
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or config.n_positions)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        self._cache: OrderedDict[str, ServedAdapter] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="tandem-generate", daemon=True)
        self._worker.start()

    # Requests --------------------------------------------------------------------------------
    def submit(
        self,
        adapter: str,
        prompts: list[str],
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        seed: int = 0,
        who: str | None = None,
    ) -> Future:
        """Validates a request and queues it; the Future yields a Generation.

        Args:
            who: The caller's identity: it may use its own adapters and public ones (None: any adapter).

        Raises:
            AdapterNotFound: no adapter named `adapter` is registered for `who`.
            NotServable: the adapter cannot be applied over the shared model.
            InvalidRequest: no prompts, too many, an empty or too long prompt, a bad temperature or token count.
            Overloaded: too many requests are waiting.
        """
        if self._closed.is_set():
            raise ServingClosed("the server is shutting down; retry against a running server")
        if not prompts:
            raise InvalidRequest("no prompts: send at least one")
        if len(prompts) > self.cfg.max_batch:
            raise InvalidRequest(
                f"{len(prompts)} prompts in one request, over the server's limit of {self.cfg.max_batch}; "
                "split them over several requests"
            )
        if max_new_tokens < 0:
            raise InvalidRequest(f"max_new_tokens must be >= 0 (0: the server's default), got {max_new_tokens}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidRequest(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        n_new = min(max_new_tokens or self.cfg.default_new_tokens, self.cfg.max_new_tokens)
        with self._tok_lock:
            ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        for k, p in enumerate(ids):
            if not p:
                raise InvalidRequest(f"prompt {k} is empty after tokenization; send some text")
            if len(p) + n_new > self.max_positions:
                raise InvalidRequest(
                    f"prompt {k} has {len(p)} tokens; with {n_new} new tokens that exceeds the model's "
                    f"{self.max_positions} positions: shorten it or ask for fewer tokens"
                )
        served = self.adapter(adapter, who) if adapter else None
        if self._queue.qsize() >= self.cfg.max_queued:
            raise Overloaded(f"{self._queue.qsize()} generate requests are waiting; retry in a moment")
        pending = _Pending(DecodeJob(served, ids, n_new, float(temperature), int(seed)), adapter)
        self._queue.put(pending)
        return pending.future

    def generate(
        self,
        adapter: str,
        prompts: list[str],
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        seed: int = 0,
        who: str | None = None,
    ) -> Generation:
        """`submit` and wait for the result."""
        return self.submit(adapter, prompts, max_new_tokens, temperature, seed, who).result()

    def adapter(self, name: str, who: str | None = None) -> ServedAdapter:
        """The loaded adapter `name` (from the cache, else from the registry), if identity `who` may use it.

        Raises:
            AdapterNotFound: no adapter of that name is registered, or it belongs to another identity
                (the message does not tell which).
            NotServable: it cannot be served (see `load_served`).
        """
        found = self.offsite.lookup(name, who)
        if found is None:
            known = [r.name for r in self.offsite.list(who)]
            whose = "" if who is None else f" for identity {who!r}"
            raise AdapterNotFound(
                f"no adapter {name!r} is registered{whose} on this server (yours and public ones: "
                f"{known or 'none'}); upload it with `client push --adapter DIR --name NAME`, or leave "
                "--adapter empty for the base model"
            )
        reg, directory = found
        with self._cache_lock:
            hit = self._cache.get(name)
            if hit is not None and hit.sha256 == reg.sha256:
                self._cache.move_to_end(name)
                return hit
            served = load_served(name, reg.sha256, directory, self.slots)
            self._cache[name] = served
            while len(self._cache) > self.cfg.adapter_cache:
                self._cache.popitem(last=False)
            return served

    def close(self, timeout: float = 30.0) -> None:
        """Stops taking requests, finishes the batch in progress, fails the waiting ones with ServingClosed."""
        self._closed.set()
        self._queue.put(None)
        self._worker.join(timeout)

    # Worker ----------------------------------------------------------------------------------
    def _collect(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
        """The batch that starts with `first`, and the request that did not fit (it starts the next)."""
        batch, n = [first], len(first.job.prompts)
        deadline = time.monotonic() + self.cfg.window_ms / 1000
        while n < self.cfg.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None or n + len(nxt.job.prompts) > self.cfg.max_batch:
                return batch, nxt
            batch.append(nxt)
            n += len(nxt.job.prompts)
        return batch, None

    def _loop(self) -> None:
        carry: _Pending | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                break
            batch, carry = self._collect(first)
            self._run([p for p in batch if p.future.set_running_or_notify_cancel()])  # callers that hung up are skipped
        while True:  # closing: whatever still waits is refused
            try:
                p = self._queue.get_nowait()
            except queue.Empty:
                break
            if p is not None and p.future.set_running_or_notify_cancel():
                p.future.set_exception(ServingClosed("the server is shutting down; retry against a running server"))

    def _run(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            results = decode(self.model, [p.job for p in batch], self.pad_id, self.eos_ids, self.impl)
        except Exception as e:  # noqa: BLE001 - the worker must survive; each caller gets the error
            log.exception("generate batch of %d request(s) failed", len(batch))
            for p in batch:
                p.future.set_exception(e)
            return
        n = sum(len(p.job.prompts) for p in batch)
        log.debug(
            "decoded %d sequence(s) of %d request(s), %d adapter(s), in %.3f s",
            n,
            len(batch),
            len({p.job.key for p in batch}),
            time.perf_counter() - t0,
        )
        for p, res in zip(batch, results):
            with self._tok_lock:
                done = [
                    Completion(self.tokenizer.decode(toks, skip_special_tokens=True), toks, len(prompt), why)
                    for (toks, why), prompt in zip(res, p.job.prompts)
                ]
            p.future.set_result(Generation(done, p.adapter_name, n))
