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

from tandem.stages.adapter_files import CLIENT_BLOCKS, adapter_digest, read_adapter_dir
from tandem.stages.loading import LoadedModel
from tandem.stages.lora import load_peft_tensors

from .decode import DecodeJob, ServedAdapter, decode, wrap_all_blocks
from .errors import AdapterNotFound, InvalidRequest, NotServable, Overloaded, ServingClosed
from .registry import AdapterRegistry

log = logging.getLogger(__name__)

CHARS_PER_POSITION = 32  # no token of a real vocabulary is longer: a longer prompt cannot fit
_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")  # keys as load_peft_tensors returns them


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
    if adapter_digest(read_adapter_dir(directory)) != sha256:
        raise NotServable(
            f"adapter {name!r}'s files on this server no longer match its registered digest; push it again"
        )
    cfg, raw = load_peft_tensors(directory)
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise NotServable(
            f"adapter {name!r} uses DoRA or per-module ranks/alphas; serving supports plain LoRA with one r and alpha"
        )
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _KEY.fullmatch(key)
        if match is None or match.group(1) not in slots:
            raise NotServable(
                f"adapter {name!r} adapts {key!r}, which is not a layer inside the model's blocks; "
                "serving applies LoRA to block layers only"
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    tensors = {}
    for slot, halves in pairs.items():
        if set(halves) != {"A", "B"}:
            raise NotServable(
                f"adapter {name!r} has lora_{next(iter(halves))} but not its pair for {slot!r}; push a complete adapter"
            )
        tensors[slot] = (halves["A"], halves["B"])
    return ServedAdapter(name, sha256, tensors, scaling)


class ServingService:
    """Generates text for requests that name a registered adapter; knows nothing of gRPC.

    Requests wait in a queue. A worker thread takes the first, collects more for up to
    `window_ms` (or until `max_batch` sequences), and decodes them all as one batch with
    `decode`; a request never splits across batches. Construct it after SplitService: it
    adds LoRA slots to the blocks the split service leaves bare (unbound slots change nothing).

    Args:
        loaded: The served model (its tokenizer is read from its directory).
        registry: The adapter registry (`client push`).
        cfg: Batching and limits.
    """

    def __init__(
        self, loaded: LoadedModel, registry: AdapterRegistry, cfg: ServingConfig | None = None, impl: str = "auto"
    ):
        from tandem.stages.loading import load_tokenizer

        self.cfg = cfg or ServingConfig()
        self.model = loaded.model
        self.registry = registry
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
        limit = self.max_positions * CHARS_PER_POSITION  # before tokenizing: the tokenizer lock is shared
        long = next((k for k, prompt in enumerate(prompts) if len(prompt) > limit), None)
        if long is not None:
            raise InvalidRequest(
                f"prompt {long} has over {limit} characters, more than the model's {self.max_positions} positions hold"
            )
        with self._tok_lock:
            ids = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        for k, prompt_ids in enumerate(ids):
            if not prompt_ids:
                raise InvalidRequest(f"prompt {k} is empty after tokenization; send some text")
            if len(prompt_ids) + n_new > self.max_positions:
                raise InvalidRequest(
                    f"prompt {k} has {len(prompt_ids)} tokens; with {n_new} new tokens that exceeds the model's "
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
        found = self.registry.lookup(name, who)
        if found is None:
            known = [r.name for r in self.registry.list(who)]
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
            live = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
            self._run(live)  # callers that hung up are skipped
        while True:  # closing: whatever still waits is refused
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None and pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(
                    ServingClosed("the server is shutting down; retry against a running server")
                )

    def _run(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        try:
            results = decode(self.model, [pending.job for pending in batch], self.pad_id, self.eos_ids, self.impl)
        except Exception as e:  # noqa: BLE001 - the worker must survive; each caller gets the error
            if len(batch) > 1:  # one request's failure (its adapter, its sampling) must not fail the others
                log.warning(
                    "generate batch of %d requests failed (%s); running each alone", len(batch), type(e).__name__
                )
                for pending in batch:
                    self._run([pending])
                return
            log.exception("generate request failed")
            batch[0].future.set_exception(e)
            return
        sequences = sum(len(pending.job.prompts) for pending in batch)
        log.debug(
            "decoded %d sequence(s) of %d request(s), %d adapter(s), in %.3f s",
            sequences,
            len(batch),
            len({pending.job.key for pending in batch}),
            time.perf_counter() - started,
        )
        for pending, res in zip(batch, results):
            with self._tok_lock:
                done = [
                    Completion(self.tokenizer.decode(toks, skip_special_tokens=True), toks, len(prompt), why)
                    for (toks, why), prompt in zip(res, pending.job.prompts)
                ]
            pending.future.set_result(Generation(done, pending.adapter_name, sequences))
