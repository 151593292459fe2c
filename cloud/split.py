"""The split-tuning service in process: the frozen middle of one model served to many sessions (pure torch)."""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch import nn

from tandem.stages.arch import num_blocks, parts_of
from tandem.stages.errors import LayoutError
from tandem.stages.loading import LoadedModel, client_state, config_json, tokenizer_files
from tandem.stages.lora import Binding, LoraConfig, Segment, bind, inject_slots
from tandem.stages.lora_layers import select_slots
from tandem.stages.modules import MiddleStage, StageLayout

from . import remote_lora
from .admission import AdapterShape, StateModel, resolve_mode
from .batching import Batcher, BatchingConfig
from .client_stages import ClientFiles
from .errors import InvalidRequest
from .limits import RequestChecks, ServiceLimits
from .optimizer import AdamWSpec
from .recompute import Replay, dropout_generator
from .sessions import Pending, Session, SessionStore, StoreConfig

log = logging.getLogger(__name__)


def linear_leaves(blocks: nn.ModuleList) -> tuple[str, ...]:
    """The last names of every linear layer in `blocks` (the layers a LoRA can target)."""
    names = set()
    for block in blocks:
        for path, module in block.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                names.add(path.rsplit(".", 1)[-1])
    return tuple(sorted(names))


class SplitService:
    """Runs the middle blocks for sessions; knows nothing of gRPC or Ray (a `Backbone`, cloud/backbone.py).

    Every adaptable layer of the middle blocks is wrapped in a LoRASlot once, at start-up. A
    session's remote LoRA is bound only for the duration of its own calls, so sessions never
    see each other's adapters and the frozen weights are shared. The caller looks a session up
    (with its owner) in `store` and hands it to the methods.
    """

    kill_revive = True  # forward() takes Kill-and-Revive's live slots
    generation = True  # serves generation sessions (a KV cache of the middle, cloud/generation.py)

    def __init__(
        self,
        loaded: LoadedModel,
        layout: StageLayout,
        store: StoreConfig | None = None,
        limits: ServiceLimits | None = None,
        blocks: list[int] | None = None,
        serve_client_files: bool = True,
        batching: BatchingConfig | None = None,
        forward_state: str = "keep",
    ):
        """Args:
        blocks: Serve only these middle blocks (a pipeline shard); default all of the layout's middle.
        serve_client_files: Serve the client's stages and tokenizer for download (the front door does; shards do not).
        batching: Batch concurrent sessions through one pass of the middle (None: each request runs alone).
        forward_state: What a training step keeps for its backward: keep (its graph), recompute (its input;
            backward reruns the forward, cloud/recompute.py) or auto (recompute on an accelerator, keep on the CPU).
        """
        self.loaded, self.layout = loaded, layout
        self.placement = loaded.placement  # where the frozen weights compute (stages/precision.py)
        self.limits = limits or ServiceLimits()
        self.store = SessionStore(store or StoreConfig())
        self.parts = parts_of(loaded.model)
        if layout.num_layers != num_blocks(loaded.config):
            raise LayoutError(f"layout is for {layout.num_layers} blocks, the model has {num_blocks(loaded.config)}")
        mids = list(blocks) if blocks is not None else layout.middle_blocks
        if not set(mids) <= set(layout.middle_blocks):
            raise LayoutError(f"blocks {mids} are not all middle blocks of the layout")
        mid_list = nn.ModuleList(self.parts.blocks[i] for i in mids)
        self.middle_leaves = linear_leaves(mid_list)
        self.all_slots = inject_slots(mid_list, self.parts.arch, mids, self.middle_leaves)
        self.middle = MiddleStage(self.parts, mids)
        self.hidden_size = int(self.parts.embed.weight.shape[1])
        self.max_positions = int(getattr(loaded.config, "max_position_embeddings", 0) or loaded.config.n_positions)
        self.checks = RequestChecks(
            self.limits,
            loaded.model_id,
            self.hidden_size,
            self.max_positions,
            self.middle_leaves,
            tuple(self.parts.arch.lora_targets),
            layout.num_layers,
        )
        # Packed once into a private file, not kept in memory (cloud/client_stages.py); every session gets the same bytes.
        state = client_state(self.parts, self.layout) if serve_client_files else None
        self.client_files = ClientFiles(state, tokenizer_files(loaded.path) if serve_client_files else {})
        self.config_json = config_json(loaded.config)
        self.state_model = StateModel(self.middle, loaded.model, self.hidden_size, self.max_positions)
        self.forward_state = resolve_mode(forward_state, self.state_model.device)
        self.replay_lock = threading.Lock()  # one rerun graph at a time outside the batcher (whose worker is serial)
        recompute = self.forward_state == "recompute"
        counter, sessions = self.state_model.counter, lambda: len(self.store)
        self.batcher = Batcher(self.middle, batching, counter, sessions, recompute) if batching else None
        log.info(
            "serving %s: %d blocks, client %d:%d, %d middle slots, forward state: %s",
            *(loaded.model_id, layout.num_layers, layout.bottom, layout.top, len(self.all_slots), self.forward_state),
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
        targets = self.checks.session(model_id, lora, remote_lora, (codec, gradient_codec), optimizer)
        slots = [x for x in select_slots(self.all_slots, lora.layers) if x.name.rsplit(".", 1)[-1] in targets]
        slots = slots if remote_lora else []
        remote_lora = bool(slots)  # --lora-layers may list no middle block: then there is no remote LoRA
        if optimizer is not None and not slots:
            raise InvalidRequest("a cloud optimizer needs a remote LoRA, and lora_layers lists no middle block")
        # What the session keeps for its whole life: the remote LoRA, and with a cloud optimizer its two AdamW moments.
        resident = 4 * sum(lora.rank * (x.in_features + x.out_features) for x in slots) * (3 if optimizer else 1)
        session = self.store.open(owner, lora, slots, remote_lora, codec, gradient_codec, sid=sid, resident=resident)
        session.opt_spec = optimizer
        return session

    def close_session(self, session: Session) -> None:
        self.store.close(session)
        if self.batcher is not None:
            self.batcher.forget(session.id)

    # Compute ---------------------------------------------------------------------------------
    def forward(
        self,
        session: Session,
        step: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        lora_version: int,
        lora_flat: torch.Tensor | None,
        dropout_seed: int,
        train: bool,
        live: list[bool] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Runs the middle; in train mode keeps the graph for backward. Returns (output, compute seconds).
        live: Kill-and-Revive's live slots (remote_lora.lora_for); None: every slot."""
        self.checks.activations(hidden, mask, "hidden")
        # What arrived (float32 on the CPU, whatever the codec) computes in the model's placement (dtype, device).
        hidden, mask = hidden.to(self.placement.device, self.placement.dtype), mask.to(self.placement.device)
        args = (step, hidden, mask, lora_version, lora_flat, dropout_seed)
        with session.lock:
            batched = self.batcher is not None and (len(self.store) > 1 or self.batcher.busy)
            if not train:
                return self._forward_in(session, *args, False, batched, live)
            # Refuse, or make room, before the compute: memory is spent as the forward runs. The reservation
            # holds until the real state is stored, or is given back if the forward fails.
            padded = batched or not bool(mask.all())
            b, t = hidden.shape[:2]
            estimate = self.state_model.estimate(self.forward_state, b, t, padded, AdapterShape.of(session))
            self.store.admit(session, step, estimate)
            try:
                return self._forward_in(session, *args, True, batched, live)
            finally:
                self.store.unreserve(session, step)

    def _forward_in(
        self,
        session: Session,
        step: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        lora_version: int,
        lora_flat: torch.Tensor | None,
        dropout_seed: int,
        train: bool,
        batched: bool,
        live: list[bool] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """The forward itself, once admitted (the session's lock is held)."""
        lora = remote_lora.lora_for(session, lora_version, lora_flat, live)
        segment = Segment(
            hidden.shape[0],
            {slot.name: (lora[2 * i], lora[2 * i + 1]) for i, slot in enumerate(session.slots)},
            session.lora_cfg.scaling,
            session.lora_cfg.dropout if train else 0.0,
            dropout_generator(dropout_seed, session.lora_cfg.dropout),
        )
        if batched:
            return self._forward_batched(session, step, hidden, mask, lora, segment, train)
        start = time.perf_counter()
        binding = Binding(segment.tensors, segment.scaling, segment.dropout, segment.generator)
        attention_mask = mask.to(torch.long)
        if train and self.forward_state == "recompute":
            replay = Replay.of(hidden, mask, [segment])
            with torch.no_grad(), bind(binding):
                out = self.middle(hidden, attention_mask)
            self.store.put(session, step, Pending(None, None, lora, replay.nbytes(), replay=replay))
        elif train:
            h_in = hidden.requires_grad_(True)
            saved = self.state_model.counter()
            with torch.enable_grad(), bind(binding), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = self.middle(h_in, attention_mask)
            self.store.put(session, step, Pending(h_in, out, lora, saved.total + hidden.nbytes + out.nbytes))
        else:
            with torch.no_grad(), bind(binding):
                out = self.middle(hidden, attention_mask)
        session.last_used = time.monotonic()  # a long compute must not count as idle time
        return out.detach(), time.perf_counter() - start

    def _forward_batched(self, session: Session, step: int, hidden, mask, lora, segment: Segment, train: bool):
        """forward() through the batcher: this session's rows share one pass with other sessions'."""
        out, group, index, seconds, nbytes = self.batcher.forward(hidden, mask, segment, train, member=session.id)
        if train:
            kept = None if group.replay is not None else out  # recompute mode keeps no output
            shape = tuple(out.shape)
            pending = Pending(None, kept, lora, nbytes, group=group, index=index, session=session, out_shape=shape)
            try:
                self.store.put(session, step, pending)
            except BaseException:
                group.done[index] = True  # the group must not wait for this member's backward
                raise
            group.stored(index, pending)
        session.last_used = time.monotonic()
        return out, seconds

    def backward(self, session: Session, step: int, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Back-propagates through the stored graph. Returns (grad input, flat LoRA grads, compute seconds)."""
        self.checks.activations(grad_out, None, "grad_output")
        grad_out = grad_out.to(self.placement.device, self.placement.dtype)
        with session.lock:
            pending = self.store.take(session, step)
            if tuple(grad_out.shape) != pending.out_shape:
                self.store.put(session, step, pending)  # keep it: the client may resend a correct gradient
                raise InvalidRequest(
                    f"grad_output: expected shape {list(pending.out_shape)}, got {list(grad_out.shape)}"
                )
            # A cloud optimizer makes the update the client would have made; nothing LoRA-sized goes back.
            update = (lambda flat: remote_lora.cloud_step(session, flat)) if session.optimizer is not None else None
            if pending.group is not None:
                grad_in, flat, seconds = self.batcher.backward(pending.group, pending.index, grad_out, then=update)
            else:
                grad_in, flat, seconds = self._backward_alone(pending, grad_out, update)
            session.last_used = time.monotonic()
            return grad_in, flat, seconds

    def _backward_alone(
        self, pending: Pending, grad_out: torch.Tensor, update
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Backward through a graph of this session alone (in recompute mode, its forward rerun first)."""
        start = time.perf_counter()
        trained = [t for t in pending.lora if t.requires_grad]  # Kill-and-Revive: killed slots' are detached
        if pending.replay is not None:
            with self.replay_lock:  # one rerun graph alive at a time: recompute mode's memory stays bounded
                h_in, out = pending.replay.rerun(self.middle)
                grads = torch.autograd.grad(out, [h_in, *trained], grad_out, allow_unused=True)
                h_in = out = None
        else:
            grads = torch.autograd.grad(pending.out, [pending.h_in, *trained], grad_out, allow_unused=True)
        lora_grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[1:], trained)]
        flat = torch.cat([g.reshape(-1) for g in lora_grads]) if lora_grads else torch.zeros(0)
        flat = update(flat) if update is not None else flat
        return grads[0], flat, time.perf_counter() - start

    # Cloud optimizer state ---------------------------------------------------------------------
    def remote_state(self, session: Session) -> dict:
        """The remote LoRA and its AdamW state of a cloud optimizer session (flat tensors, steps, version)."""
        return remote_lora.state_of(session)

    def put_remote_state(
        self,
        session: Session,
        lora: torch.Tensor | None,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        steps: int,
        version: int,
    ) -> None:
        """Replaces a cloud optimizer session's remote LoRA and AdamW state (the client resumes a checkpoint)."""
        remote_lora.restore(session, lora, exp_avg, exp_avg_sq, steps, version)

    def stop(self) -> None:
        """Stops the batching worker (if any) and closes the client stages file (its space is freed)."""
        if self.batcher is not None:
            self.batcher.stop()
        self.client_files.close()
