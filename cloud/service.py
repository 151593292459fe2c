"""The cloud's pure-torch core: serves the frozen middle of one model to many sessions."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from tandem.kernels.checks import all_finite
from tandem.kernels.codecs import CODECS
from tandem.stages.arch import num_blocks, parts_of
from tandem.stages.errors import LayoutError
from tandem.stages.loading import LoadedModel, client_state, config_json, pack_state, sha256, tokenizer_files
from tandem.stages.lora import Binding, LoraConfig, Segment, bind, inject_slots, slot_shapes, unflatten
from tandem.stages.modules import MiddleStage, StageLayout

from .batching import Batcher, BatchingConfig
from .errors import InvalidRequest, LoraMissing, clip
from .optimizer import AdamWSpec, RemoteOptimizer
from .sessions import Pending, Session, SessionStore, StoreConfig

log = logging.getLogger(__name__)

MAX_ALPHA = 1e4  # LoRA alpha; the scale is alpha / rank, and a huge one only overflows the middle's activations


@dataclass
class ServiceLimits:
    """Per-request limits the service enforces."""

    max_tokens_per_step: int = 64 * 1024
    cloud_optimizer: bool = (
        True  # run the remote LoRA's optimizer for sessions that ask (`client tune --cloud-optimizer`)
    )
    max_lora_rank: int = 256  # a session's LoRA rank; its remote LoRA's size grows with it
    max_lora_targets: int = 16  # target module names in one LoraSpec

    def __post_init__(self):
        if self.max_lora_rank < 1 or self.max_lora_targets < 1:
            raise ValueError("--max-lora-rank and --max-lora-targets must be >= 1")


def _linear_leaves(blocks: nn.ModuleList) -> tuple[str, ...]:
    names = set()
    for block in blocks:
        for path, m in block.named_modules():
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
                names.add(path.rsplit(".", 1)[-1])
    return tuple(sorted(names))


class BackboneService:
    """Runs the middle blocks for sessions; knows nothing of gRPC or Ray.

    Every adaptable layer of the middle blocks is wrapped in a LoRASlot once, at start-up. A
    session's remote LoRA is bound only for the duration of its own calls, so sessions never
    see each other's adapters and the frozen weights are shared.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        layout: StageLayout,
        store: StoreConfig | None = None,
        limits: ServiceLimits | None = None,
        blocks: list[int] | None = None,
        serve_client_files: bool = True,
        batching: BatchingConfig | None = None,
    ):
        """Args:
        blocks: Serve only these middle blocks (a pipeline shard); default all of the layout's middle.
        serve_client_files: Pack the client's stages for download (the front door does; shards do not).
        batching: Batch concurrent sessions through one pass of the middle (None: each request runs alone).
        """
        self.loaded = loaded
        self.layout = layout
        self.limits = limits or ServiceLimits()
        self.store = SessionStore(store or StoreConfig())
        self.parts = parts_of(loaded.model)
        if layout.num_layers != num_blocks(loaded.config):
            raise LayoutError(f"layout is for {layout.num_layers} blocks, the model has {num_blocks(loaded.config)}")
        mids = list(blocks) if blocks is not None else layout.middle_blocks
        if not set(mids) <= set(layout.middle_blocks):
            raise LayoutError(f"blocks {mids} are not all middle blocks of the layout")
        self.middle_leaves = _linear_leaves(nn.ModuleList(self.parts.blocks[i] for i in mids))
        mid_list = nn.ModuleList(self.parts.blocks[i] for i in mids)
        self.all_slots = inject_slots(mid_list, self.parts.arch, mids, self.middle_leaves)
        self.middle = MiddleStage(self.parts, mids)
        self.hidden_size = int(self.parts.embed.weight.shape[1])
        self.max_positions = int(getattr(loaded.config, "max_position_embeddings", 0) or loaded.config.n_positions)
        # The client's stages are packed once; every session downloads the same bytes.
        self.client_blob, self.client_files = b"", {}
        if serve_client_files:
            self.client_blob = pack_state(client_state(self.parts, layout))
            self.client_files = {"client_stages.safetensors": self.client_blob, **tokenizer_files(loaded.path)}
        self.client_sha = sha256(self.client_blob)
        self.client_file_sha = {name: sha256(blob) for name, blob in self.client_files.items()}
        self.config_json = config_json(loaded.config)
        self._param_ptrs = {p.data_ptr() for p in loaded.model.parameters()}
        # Padding makes the attention keep a (batch, seq, seq) mask per block: a second fit for padded passes.
        self._state_fit = {pad: self._calibrate(pad) for pad in (False, True)}
        self.batcher = (
            Batcher(self.middle, batching, lambda: _SavedBytes(self._param_ptrs), sessions=lambda: len(self.store))
            if batching
            else None
        )
        log.info(
            "serving %s: %d blocks, client %d:%d, %d middle slots",
            loaded.model_id,
            layout.num_layers,
            layout.bottom,
            layout.top,
            len(self.all_slots),
        )

    # Sessions ------------------------------------------------------------------------------
    def open_session(
        self,
        owner: str,
        model_id: str,
        lora: LoraConfig,
        remote_lora: bool,
        codec: str = "float32",
        gradient_codec: str = "float32",
        sid: str | None = None,
        optimizer: AdamWSpec | None = None,
    ) -> Session:
        """Opens a session; with `optimizer`, the cloud applies the remote LoRA's AdamW updates itself."""
        if optimizer is not None and not self.limits.cloud_optimizer:
            raise InvalidRequest(
                "this server does not run optimizers for clients (cloud serve --no-cloud-optimizer); "
                "tune without --cloud-optimizer: your client then updates the remote LoRA itself"
            )
        if optimizer is not None and not remote_lora:
            raise InvalidRequest(
                "a cloud optimizer needs a remote LoRA (remote_lora=true): there is nothing else to optimize here"
            )
        if model_id and model_id != self.loaded.model_id:
            raise InvalidRequest(f"this server serves {self.loaded.model_id!r}, not {clip(model_id)}")
        for c in (codec, gradient_codec):
            if c not in CODECS:
                raise InvalidRequest(f"codec {clip(c)} is not supported; choose one of {list(CODECS)}")
        if not math.isfinite(lora.alpha) or abs(lora.alpha) > MAX_ALPHA:
            raise InvalidRequest(
                f"LoRA alpha must be a finite number of magnitude <= {MAX_ALPHA:g}, got {clip(lora.alpha)}"
            )
        if lora.rank > self.limits.max_lora_rank:
            raise InvalidRequest(
                f"LoRA rank {lora.rank} is over this server's limit of {self.limits.max_lora_rank} "
                "(cloud serve --max-lora-rank); use a smaller --rank"
            )
        if len(lora.target_modules) > self.limits.max_lora_targets:
            raise InvalidRequest(
                f"{len(lora.target_modules)} target modules named, over this server's limit of "
                f"{self.limits.max_lora_targets} (cloud serve --max-lora-targets)"
            )
        targets = set(lora.target_modules or self.parts.arch.lora_targets)
        unknown = sorted(t for t in targets if t not in self.middle_leaves)
        if unknown:
            raise InvalidRequest(
                f"target modules {clip(unknown)} do not exist in this model; available: {list(self.middle_leaves)}"
            )
        slots = [s for s in self.all_slots if s.name.rsplit(".", 1)[-1] in targets] if remote_lora else []
        # What the session keeps for its whole life: the remote LoRA, and with a cloud optimizer its two AdamW moments.
        resident = 4 * sum(lora.rank * (sl.in_features + sl.out_features) for sl in slots) * (3 if optimizer else 1)
        s = self.store.open(owner, lora, slots, remote_lora, codec, gradient_codec, sid=sid, resident=resident)
        s.opt_spec = optimizer
        return s

    def close_session(self, owner: str, sid: str) -> None:
        self.store.close(sid, owner)
        if self.batcher is not None:
            self.batcher.forget(sid)

    # Compute ---------------------------------------------------------------------------------
    def _check_activations(self, h: torch.Tensor, mask: torch.Tensor | None, name: str) -> None:
        if h.dim() != 3 or h.shape[2] != self.hidden_size:
            raise InvalidRequest(f"{name}: expected shape [batch, seq, {self.hidden_size}], got {list(h.shape)}")
        b, t = h.shape[0], h.shape[1]
        if b == 0 or t == 0:
            raise InvalidRequest(f"{name}: empty batch {list(h.shape)}")
        if b * t > self.limits.max_tokens_per_step:
            raise InvalidRequest(
                f"{name}: {b * t} tokens in one step, over the server's limit of {self.limits.max_tokens_per_step}; use a smaller batch"
            )
        if t > self.max_positions:
            raise InvalidRequest(f"{name}: sequence length {t} exceeds the model's {self.max_positions} positions")
        if h.dtype != torch.float32:
            raise InvalidRequest(f"{name}: expected float32, got {h.dtype}")
        if not all_finite(h):
            raise InvalidRequest(f"{name}: contains NaN or Inf")
        if mask is not None:
            if tuple(mask.shape) != (b, t):
                raise InvalidRequest(f"attention_mask: expected shape [{b}, {t}], got {list(mask.shape)}")
            if mask.dtype != torch.uint8 or bool(((mask != 0) & (mask != 1)).any()):
                raise InvalidRequest("attention_mask: expected uint8 zeros and ones")
            if bool((mask.sum(dim=1) == 0).any()):
                raise InvalidRequest("attention_mask: a row has no real token")

    # Admission -------------------------------------------------------------------------------
    def _saved_bytes(self, b: int, t: int, pad: bool) -> int:
        """Bytes autograd keeps for one training forward of (b, t) tokens through the middle, without adapters."""
        h = torch.zeros(b, t, self.hidden_size, requires_grad=True)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[:, 0] = 0 if pad else 1
        saved = _SavedBytes(self._param_ptrs)
        with torch.enable_grad(), bind(None), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            self.middle(h, mask)
        return saved.total

    def _calibrate(self, pad: bool) -> tuple[float, float, float]:
        """Fits the middle's forward state as k + b*(a*t + c*t^2) bytes from three tiny passes (c: attention
        maps, when the attention implementation keeps them), so a request's state is known before it runs."""
        t1, t2 = min(32, self.max_positions), min(64, self.max_positions)
        f11, f12, f22 = (self._saved_bytes(b, t, pad) for b, t in ((1, t1), (1, t2), (2, t2)))
        row2 = f22 - f12  # one row of t2 tokens
        k = max(0.0, f12 - row2)
        row1 = f11 - k
        c = max(0.0, (row2 / t2 - row1 / t1) / (t2 - t1)) if t2 > t1 else 0.0
        a = max(0.0, row1 / t1 - c * t1, row2 / t2 - c * t2)
        return k, a, c

    def state_estimate(self, s: Session, b: int, t: int, padded: bool = True) -> int:
        """The forward state a training forward of (b, t) tokens in session s will keep, in bytes (see _calibrate);
        `padded`: some row has padding (or the pass is shared, where rows are padded to a common length)."""
        k, a, c = self._state_fit[padded]
        per_token = 2 * self.hidden_size * 4  # the input and output kept with the graph
        for sl in s.slots:  # the LoRA path: A x (rank), and with dropout its mask and dropped-out input
            per_token += 4 * 2 * s.lora_cfg.rank + (8 * sl.in_features if s.lora_cfg.dropout > 0 else 0)
        return int(k + b * (a * t + c * t * t) + b * t * per_token)

    def _lora_for(self, s: Session, version: int, flat: torch.Tensor | None) -> list[torch.Tensor]:
        if not s.remote_lora:
            return []
        if flat is not None:
            if flat.dtype != torch.float32 or flat.dim() != 1:
                raise InvalidRequest(f"lora: expected a flat float32 vector, got {flat.dtype} {list(flat.shape)}")
            if not all_finite(flat):
                raise InvalidRequest("lora: contains NaN or Inf")
            try:
                tensors = unflatten(flat, slot_shapes(s.slots, s.lora_cfg.rank))
            except LayoutError as e:
                raise InvalidRequest(f"lora: {e}") from None
            if s.opt_spec is not None:  # a fresh start: new AdamW state (PutRemoteState restores a saved one)
                s.optimizer = RemoteOptimizer(s.opt_spec, tensors)
                s.lora = s.optimizer.tensors()
            else:
                s.lora = [t.clone().requires_grad_(True) for t in tensors]
            s.lora_version = version
        elif not s.lora:
            raise LoraMissing(
                "the cloud holds no remote LoRA for this session yet; resend the adapter with this Forward"
            )
        elif version != s.lora_version:
            raise LoraMissing(
                f"the cloud holds remote-LoRA version {s.lora_version}, not {version}; resend the adapter"
            )
        return s.lora

    def forward(
        self,
        owner: str,
        sid: str,
        step: int,
        h: torch.Tensor,
        mask: torch.Tensor,
        lora_version: int,
        lora_flat: torch.Tensor | None,
        dropout_seed: int,
        train: bool,
    ) -> tuple[torch.Tensor, float]:
        """Runs the middle; in train mode keeps the graph for backward. Returns (output, compute seconds)."""
        s = self.store.get(sid, owner)
        self._check_activations(h, mask, "hidden")
        with s.lock:
            batched = self.batcher is not None and (len(self.store) > 1 or self.batcher.busy)
            if not train:
                return self._forward_in(s, step, h, mask, lora_version, lora_flat, dropout_seed, False, batched)
            # Refuse, or make room, before the compute: memory is spent as the forward runs. The reservation
            # holds until the real state is stored, or is given back if the forward fails.
            self.store.admit(s, step, self.state_estimate(s, h.shape[0], h.shape[1], batched or not bool(mask.all())))
            try:
                return self._forward_in(s, step, h, mask, lora_version, lora_flat, dropout_seed, True, batched)
            finally:
                self.store.unreserve(s, step)

    def _forward_in(
        self,
        s: Session,
        step: int,
        h: torch.Tensor,
        mask: torch.Tensor,
        lora_version: int,
        lora_flat: torch.Tensor | None,
        dropout_seed: int,
        train: bool,
        batched: bool,
    ) -> tuple[torch.Tensor, float]:
        """The forward itself, once admitted (the session's lock is held)."""
        lora = self._lora_for(s, lora_version, lora_flat)
        gen = torch.Generator().manual_seed(int(dropout_seed)) if s.lora_cfg.dropout > 0 else None
        if batched:
            return self._forward_batched(s, step, h, mask, lora, gen, train)
        t0 = time.perf_counter()
        binding = Binding(
            {sl.name: (lora[2 * i], lora[2 * i + 1]) for i, sl in enumerate(s.slots)},
            s.lora_cfg.scaling,
            s.lora_cfg.dropout if train else 0.0,
            gen,
        )
        am = mask.to(torch.long)
        if train:
            h_in = h.requires_grad_(True)
            saved = _SavedBytes(self._param_ptrs)
            with torch.enable_grad(), bind(binding), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = self.middle(h_in, am)
            self.store.put(s, step, Pending(h_in, out, lora, saved.total + h.nbytes + out.nbytes))
        else:
            with torch.no_grad(), bind(binding):
                out = self.middle(h, am)
        s.last_used = time.monotonic()  # a long compute must not count as idle time
        return out.detach(), time.perf_counter() - t0

    def backward(
        self, owner: str, sid: str, step: int, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Back-propagates through the stored graph. Returns (grad input, flat LoRA grads, compute seconds)."""
        s = self.store.get(sid, owner)
        self._check_activations(grad_out, None, "grad_output")
        with s.lock:
            p = self.store.take(s, step)
            if tuple(grad_out.shape) != tuple(p.out.shape):
                self.store.put(s, step, p)  # keep it: the client may resend a correct gradient
                raise InvalidRequest(f"grad_output: expected shape {list(p.out.shape)}, got {list(grad_out.shape)}")
            # A cloud optimizer makes the update the client would have made; nothing LoRA-sized goes back.
            update = (lambda flat: self._cloud_step(s, flat)) if s.optimizer is not None else None
            if p.group is not None:
                g_in, flat, dt = self.batcher.backward(p.group, p.index, grad_out, then=update)
            else:
                t0 = time.perf_counter()
                grads = torch.autograd.grad(p.out, [p.h_in, *p.lora], grad_out, allow_unused=True)
                lora_grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[1:], p.lora)]
                flat = torch.cat([g.reshape(-1) for g in lora_grads]) if lora_grads else torch.zeros(0)
                flat = update(flat) if update is not None else flat
                g_in, dt = grads[0], time.perf_counter() - t0
            s.last_used = time.monotonic()
            return g_in, flat, dt

    @staticmethod
    def _cloud_step(s: Session, flat: torch.Tensor) -> torch.Tensor:
        """Applies a cloud optimizer session's update (its lock is held by the waiting request)."""
        s.lora = s.optimizer.step(flat)
        s.lora_version += 1
        return torch.zeros(0)

    # Cloud optimizer state ---------------------------------------------------------------------
    def remote_state(self, owner: str, sid: str) -> dict:
        """The remote LoRA and its AdamW state of a cloud optimizer session (flat tensors, steps, version)."""
        s = self.store.get(sid, owner)
        with s.lock:
            if s.opt_spec is None:
                raise InvalidRequest(
                    "this session does not use a cloud optimizer; the client holds its remote LoRA itself"
                )
            if s.optimizer is None:
                raise LoraMissing("the cloud holds no remote LoRA for this session yet; send it with the first Forward")
            return {**s.optimizer.state(), "version": s.lora_version}

    def put_remote_state(
        self,
        owner: str,
        sid: str,
        lora: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        steps: int,
        version: int,
    ) -> None:
        """Replaces a cloud optimizer session's remote LoRA and AdamW state (the client resumes a checkpoint)."""
        s = self.store.get(sid, owner)
        with s.lock:
            if s.opt_spec is None:
                raise InvalidRequest(
                    "this session does not use a cloud optimizer; send the remote LoRA with Forward instead"
                )
            for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if t.dtype != torch.float32 or t.dim() != 1 or not all_finite(t):
                    raise InvalidRequest(f"{name}: expected a finite flat float32 vector")
            if lora is None:
                raise InvalidRequest("lora: PutRemoteState needs the remote LoRA")
            before = (s.optimizer, s.lora, s.lora_version)
            try:
                self._lora_for(s, version, lora)
                s.optimizer.load(exp_avg, exp_avg_sq, int(steps))
            except BaseException:
                s.optimizer, s.lora, s.lora_version = before  # a rejected state changes nothing
                raise

    def _forward_batched(self, s: Session, step: int, h, mask, lora, gen, train: bool):
        """forward() through the batcher: this session's rows share one pass with other sessions'."""
        seg = Segment(
            h.shape[0],
            {sl.name: (lora[2 * i], lora[2 * i + 1]) for i, sl in enumerate(s.slots)},
            s.lora_cfg.scaling,
            s.lora_cfg.dropout if train else 0.0,
            gen,
        )
        out, group, index, dt, nbytes = self.batcher.forward(h, mask, seg, train, member=s.id)
        if train:
            p = Pending(None, out, lora, nbytes, group=group, index=index, session=s)
            try:
                self.store.put(s, step, p)
            except BaseException:
                group.done[index] = True  # the group must not wait for this member's backward
                raise
            group.stored(index, p)
        s.last_used = time.monotonic()
        return out, dt

    def stop(self) -> None:
        """Stops the batching worker (if any)."""
        if self.batcher is not None:
            self.batcher.stop()


class _SavedBytes:
    """Counts the bytes autograd saves for backward (activations only, not the frozen weights)."""

    def __init__(self, param_ptrs: set[int]):
        self.param_ptrs = param_ptrs
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.param_ptrs and ptr not in self.seen:
                self.seen.add(ptr)
                self.total += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            self.total += t.numel() * t.element_size()
        # Detached: the same storage, but no link to t's grad_fn. Returning t itself makes a cycle through C++
        # (grad_fn -> saved t -> grad_fn) that Python's GC cannot see, so a graph whose backward never came leaked.
        return t.detach()

    @staticmethod
    def unpack(t):
        return t
