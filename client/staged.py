"""The data owner's model: local bottom and top stages, a middle that runs remotely (or in-process), one adapter."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.arch import Parts, arch_for, num_blocks, parts_of
from tandem.stages.errors import StageError
from tandem.stages.loading import (
    client_parts,
    config_from_json,
    load_model,
    unpack_state,
)
from tandem.stages.lora import LoRAAdapter, LoraConfig, SlotSpec, bind, flatten, inject_slots
from tandem.stages.modules import BottomStage, MiddleStage, StageLayout, TopStage

from .downloads import _write_atomic, fetch_client_files, load_tokenizer  # noqa: F401 (importable here)
from .errors import ClientError, ServerError
from .transport import Transport

log = logging.getLogger(__name__)

IGNORE = -100


def stage_seed(seed: int, step: int, stage: int) -> int:
    """Seed of the dropout generator of one stage at one step (0 bottom, 1 middle, 2 top)."""
    return (seed * 1_000_003 + step * 31 + stage) % (2**63 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class LocalMiddle:
    """The middle blocks in this process (local mode: the model owner's verification run)."""

    session = None  # nothing is sent: no session, no sealer
    params: list = []  # no remote LoRA: the adapter's middle slots are trained here like any other
    cloud_optimizer = False

    def __init__(self, stage: MiddleStage, adapter: LoRAAdapter, names: list[str]):
        self.stage, self.adapter, self.names = stage, adapter, names

    def __call__(self, h, am, step: int, seed: int, train: bool):
        binding = self.adapter.binding(self.names, _gen(seed) if train else None)
        if not train:
            binding.dropout = 0.0
        with bind(binding):
            return self.stage(h, am)


class _RemoteFn(torch.autograd.Function):
    """Forward sends h to the cloud; backward sends dL/d(out) and receives dL/dh and the remote-LoRA grads."""

    @staticmethod
    def forward(ctx, h, am, remote, step, seed, *lora_params):
        ctx.remote, ctx.step, ctx.seed = remote, step, seed
        ctx.save_for_backward(h, am)
        return remote.forward_rpc(h, am, step, seed, train=True)

    @staticmethod
    def backward(ctx, grad_out):
        h, am = ctx.saved_tensors
        gin, glora = ctx.remote.backward_rpc(ctx.step, grad_out, h, am, ctx.seed)
        return (gin, None, None, None, None, *glora)


class SessionLost(ClientError):
    """The cloud no longer knows this session (it restarted or expired it); the step must be redone."""


class CloudStateLost(SessionLost):
    """A cloud optimizer session was lost after its last GetRemoteState: the updates since then exist nowhere.

    Redoing the step is not enough; the run must go back to its last checkpoint (`client tune` does).
    """


@dataclass
class Session:
    """What OpenSession negotiated: id, codecs and the sealer (None when not sealing).

    `sealing` says what the sealer is worth: "authenticated" (the server's sealing certificate,
    checked against the trusted CA, signed the handshake: no hop can read or rewrite tensors),
    "unauthenticated" (no CA to check it, e.g. --insecure: passive observers only) or "off".
    """

    id: str
    codec: str
    gradient_codec: str
    sealer: object
    info: object
    lora_codec: str = "float32"
    sealing: str = "off"


class RemoteMiddle:
    """The cloud's middle blocks as a differentiable call; owns the session's wire protocol.

    `opener()` opens a session (used again after the cloud restarts: `reopen`).
    """

    def __init__(self, transport: Transport, opener, params: list[nn.Parameter], cloud_optimizer: bool = False):
        self.t = transport
        self.opener = opener
        self.session: Session = opener()
        self.params = params
        self.sent_version: int | None = None
        # Cloud optimizer: the cloud updates the remote LoRA after every Backward; `params` hold its value
        # only when `synced` (at the start, and after fetch_state / put_state).
        self.cloud_optimizer = cloud_optimizer
        self.cloud_version = 0
        self.synced = True
        self.last_state: dict | None = None  # the last fetched (or put) AdamW state

    @property
    def session_id(self) -> str:
        return self.session.id

    def reopen(self) -> None:
        """Opens a fresh session (same model, layout and slots) after the old one was lost."""
        if self.cloud_optimizer and not self.synced:
            raise CloudStateLost(
                f"the cloud lost session {self.session.id[:8]}... and with it the remote LoRA it was optimizing since "
                "the last checkpoint; go back to that checkpoint (`client tune --resume` does)"
            )
        log.warning("the cloud lost session %s...; opening a new one and redoing the step", self.session.id[:8])
        self.session = self.opener()
        self.sent_version = None
        if self.cloud_optimizer and self.last_state is not None:  # the moments, as last fetched: exactly the cloud's
            self.put_state(self.last_state, 0)

    def restart(self, state: dict | None) -> None:
        """Cloud optimizer: a new session from `params` and a saved AdamW state (None: before the first step)."""
        self.synced, self.last_state = True, state
        self.cloud_version = 0 if state is None else int(state["version"])
        self.reopen()

    def _version(self) -> int:
        if self.cloud_optimizer:
            return self.cloud_version
        # Optimizer steps update parameters in place, which bumps their version counters.
        return sum(p._version for p in self.params)  # noqa: SLF001

    def __call__(self, h, am, step: int, seed: int, train: bool):
        if train and torch.is_grad_enabled():
            return _RemoteFn.apply(h, am, self, step, seed, *self.params)
        return self.forward_rpc(h, am, step, seed, train=False)

    def _call(self, method: str, req, step: int, kind: str):
        try:
            return self.t.call(method, req, kind=kind, sealer=self.session.sealer, step=step)
        except ServerError as e:
            if e.reason == "no-session":
                raise SessionLost(str(e)) from None
            raise

    def forward_rpc(self, h, am, step: int, seed: int, train: bool, force_lora: bool = False) -> torch.Tensor:
        version = self._version()
        m = self.t.meter
        t0 = time.perf_counter()
        req = pb.ForwardRequest(
            session_id=self.session.id,
            step=step,
            hidden=serde.encode(h, self.session.codec),
            attention_mask=serde.to_proto(am.to(torch.uint8)),
            lora_version=version,
            dropout_seed=seed,
            train=train,
        )
        if self.params and (force_lora or self.sent_version != version):
            if not self.synced:  # cloud optimizer: only the cloud has the current LoRA
                raise CloudStateLost(
                    f"the cloud no longer holds remote-LoRA version {version} of session "
                    f"{self.session.id[:8]}...; go back to the last checkpoint (`client tune --resume`)"
                )
            req.lora.CopyFrom(serde.encode(flatten(self.params), self.session.lora_codec))
        m.step_serde_s += time.perf_counter() - t0
        try:
            resp = self._call("Forward", req, step, "Forward" if train else "EvalForward")
        except ServerError as e:
            if e.reason == "lora-missing" and not force_lora:
                return self.forward_rpc(h, am, step, seed, train, force_lora=True)
            raise
        self.sent_version = version
        m.step_cloud_s += resp.compute_s
        t0 = time.perf_counter()
        out = serde.decode(resp.hidden, "hidden", self.session.codec, tuple(h.shape))
        m.step_serde_s += time.perf_counter() - t0
        return out

    def backward_rpc(self, step: int, grad_out, h, am, seed: int):
        m = self.t.meter
        t0 = time.perf_counter()
        req = pb.BackwardRequest(
            session_id=self.session.id, step=step, grad_output=serde.encode(grad_out, self.session.gradient_codec)
        )
        m.step_serde_s += time.perf_counter() - t0
        try:
            resp = self._call("Backward", req, step, "Backward")
        except ServerError as e:
            if e.reason != "evicted":
                raise
            log.warning("step %d: the cloud evicted its forward state; recomputing the step's forward", step)
            self.forward_rpc(h, am, step, seed, train=True)
            resp = self._call("Backward", req, step, "Backward")
        m.step_cloud_s += resp.compute_s
        t0 = time.perf_counter()
        gin = serde.decode(resp.grad_input, "grad_input", self.session.gradient_codec, tuple(h.shape))
        if self.cloud_optimizer:  # the cloud applied the update; the client's copy is now behind
            if resp.HasField("lora_grad"):
                raise ClientError(
                    "the server returned LoRA gradients in a cloud optimizer session; it did not apply them"
                )
            self.cloud_version += 1
            self.sent_version = self.cloud_version
            self.synced = False
            m.step_serde_s += time.perf_counter() - t0
            return gin, [None] * len(self.params)
        flat = serde.decode(resp.lora_grad, "lora_grad", self.session.lora_codec)
        if flat.numel() != sum(p.numel() for p in self.params):
            raise ClientError(
                f"the cloud returned {flat.numel()} LoRA gradients, expected {sum(p.numel() for p in self.params)}"
            )
        grads, at = [], 0
        for p in self.params:
            grads.append(flat[at : at + p.numel()].view_as(p))
            at += p.numel()
        m.step_serde_s += time.perf_counter() - t0
        return gin, grads

    def fetch_state(self, step: int) -> dict:
        """Cloud optimizer: copies the cloud's remote LoRA into `params`; returns AdamW's state (for a checkpoint)."""
        resp = self._call(
            "GetRemoteState", pb.GetRemoteStateRequest(session_id=self.session.id, step=step), step, "GetRemoteState"
        )
        n = sum(p.numel() for p in self.params)
        lora = serde.from_proto(resp.lora, "lora", torch.float32)
        moments = [serde.from_proto(getattr(resp, f), f, torch.float32) for f in ("exp_avg", "exp_avg_sq")]
        if lora.numel() != n or any(t.numel() not in (0, n) for t in moments):
            raise ClientError(f"the cloud returned a remote state of the wrong size (expected {n} values)")
        with torch.no_grad():
            at = 0
            for p in self.params:
                p.copy_(lora[at : at + p.numel()].view_as(p))
                at += p.numel()
        self.cloud_version, self.sent_version, self.synced = resp.lora_version, resp.lora_version, True
        self.last_state = {
            "exp_avg": moments[0],
            "exp_avg_sq": moments[1],
            "steps": resp.optimizer_steps,
            "version": resp.lora_version,
        }
        return self.last_state

    def put_state(self, state: dict, step: int) -> None:
        """Cloud optimizer: gives the cloud `params` and a saved AdamW state (resuming a checkpoint)."""
        req = pb.RemoteState(
            session_id=self.session.id,
            step=step,
            lora=serde.to_proto(flatten(self.params)),
            exp_avg=serde.to_proto(state["exp_avg"]),
            exp_avg_sq=serde.to_proto(state["exp_avg_sq"]),
            optimizer_steps=int(state["steps"]),
            lora_version=int(state["version"]),
        )
        self._call("PutRemoteState", req, step, "PutRemoteState")
        self.cloud_version, self.sent_version, self.synced = int(state["version"]), int(state["version"]), True
        self.last_state = state

    def close(self) -> None:
        try:
            self.t.call("CloseSession", pb.CloseSessionRequest(session_id=self.session.id), retry=False)
        except ServerError as e:
            log.info("closing the session: %s", e)


@dataclass
class StagedModel:
    """Bottom and top stages on the client, a middle (remote or local), and the data owner's adapter."""

    bottom: BottomStage
    middle: object  # RemoteMiddle | LocalMiddle
    top: TopStage
    adapter: LoRAAdapter
    names: tuple[list[str], list[str], list[str]]  # slot names per stage: bottom, middle, top
    layout: StageLayout
    model_id: str
    config: object
    tokenizer: object
    mode: str
    # Applied to the bottom stage's output before it goes to the middle (e.g. clipping + noise as
    # a privacy defense): fn(h, attention_mask, step, seed, train) -> h. Runs identically in every mode.
    cut_transform: object = None
    stages_sha256: str = ""  # split mode: SHA-256 of the downloaded client stages (their cache key)

    def logits(self, ids: torch.Tensor, am: torch.Tensor, step: int, seed: int, train: bool) -> torch.Tensor:
        """Runs bottom -> middle -> top; returns (B, T, V) logits."""
        nb, nm, nt = self.names
        dropout = self.adapter.cfg.dropout if train else 0.0

        def b(names, stage):
            binding = self.adapter.binding(names, _gen(stage_seed(seed, step, stage)) if dropout else None)
            binding.dropout = dropout
            return binding

        with bind(b(nb, 0)):
            h = self.bottom(ids, am)  # (B, T, H)
        if self.cut_transform is not None:
            h = self.cut_transform(h, am, step, stage_seed(seed, step, 3), train)
        h = self.middle(h, am, step, stage_seed(seed, step, 1), train)  # (B, T, H)
        with bind(b(nt, 2)):
            return self.top(h, am)  # (B, T, V)

    def loss(self, batch: dict, step: int, seed: int, train: bool) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over labelled tokens; returns (loss, number of labelled tokens)."""
        logits = self.logits(batch["input_ids"], batch["attention_mask"], step, seed, train)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        n = int((labels != IGNORE).sum())
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        ) / max(n, 1)
        return loss, n

    def client_blocks(self) -> list[tuple[int, nn.Module]]:
        """(full-model block index, block) for every block that runs on the client."""
        return list(zip(self.layout.bottom_blocks, self.bottom.blocks)) + list(
            zip(self.layout.top_blocks, self.top.blocks)
        )

    def unfreeze_client_blocks(self) -> list[nn.Parameter]:
        """Makes the client's blocks fully trainable (Offsite-Tuning's adapter layers); returns their parameters."""
        params = []
        for _, block in self.client_blocks():
            for p in block.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    def client_block_state(self) -> dict[str, torch.Tensor]:
        """The client's blocks under their full-model names (for saving fully tuned blocks)."""
        prefix = arch_for(self.config).block_prefix
        out = {}
        for gid, block in self.client_blocks():
            for k, v in block.state_dict().items():
                out[f"{prefix}.{gid}.{k.replace('.base_layer.', '.')}"] = v.detach().contiguous()
        return out

    @property
    def session(self) -> Session | None:
        """The live cloud session (split mode; None otherwise): its codecs and sealer, for recording and the report."""
        return self.middle.session

    def close(self) -> None:
        if isinstance(self.middle, RemoteMiddle):
            self.middle.close()


def _order(specs: list[SlotSpec]) -> list[SlotSpec]:
    return sorted(specs, key=lambda s: s.block)  # stable: keeps module order inside a block


def _split_names(specs: list[SlotSpec], layout: StageLayout) -> tuple[list[str], list[str], list[str]]:
    bottom = [s.name for s in specs if s.block in layout.bottom_blocks]
    middle = [s.name for s in specs if s.block in layout.middle_blocks]
    top = [s.name for s in specs if s.block in layout.top_blocks]
    return bottom, middle, top


def _check_tokenizer(tokenizer, config) -> None:
    vocab = int(config.vocab_size)
    if len(tokenizer) > vocab:
        raise ClientError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
            "tokenizer and model do not belong together"
        )


def open_session(
    t: Transport, lora: LoraConfig, remote_lora: bool = True, model_id: str = "", cloud_optimizer: dict | None = None
) -> Session:
    """OpenSession with the transport's codecs and, unless disabled, a sealing key exchange.

    cloud_optimizer: AdamW settings (lr, beta1, beta2, eps, weight_decay) for the cloud to apply the
    remote LoRA's updates itself; None keeps the optimizer here.
    """
    from tandem.protos.sealing import new_keypair

    priv, pub = new_keypair() if t.cfg.seal else (None, b"")
    req = pb.OpenSessionRequest(
        model_id=model_id,
        lora=pb.LoraSpec(
            rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=list(lora.target_modules)
        ),
        remote_lora=remote_lora,
        codec=t.cfg.codec,
        gradient_codec=t.cfg.gradient_codec or t.cfg.codec,
        lora_codec=t.cfg.lora_codec,
        seal_public_key=pub,
    )
    if cloud_optimizer is not None:
        req.cloud_optimizer.CopyFrom(pb.AdamW(**cloud_optimizer))
    info = t.call("OpenSession", req, one_time=True)
    try:
        sealer, sealing = _sealer(t, priv, req, info) if t.cfg.seal else (None, "off")  # first: then trust the reply
        if cloud_optimizer is not None and not info.cloud_optimizer:
            raise ClientError("the server does not support --cloud-optimizer (it is too old); run without it")
    except ClientError:
        _close_quietly(t, info.session_id)  # the server opened it: do not let it count against our quota until its TTL
        raise
    return Session(
        info.session_id,
        info.codec or "float32",
        info.gradient_codec or info.codec or "float32",
        sealer,
        info,
        info.lora_codec or "float32",
        sealing,
    )


def _close_quietly(t: Transport, session_id: str) -> None:
    try:
        t.call("CloseSession", pb.CloseSessionRequest(session_id=session_id), retry=False)
    except ClientError as e:
        log.info("closing the refused session: %s", e)


@functools.cache
def _warn_unauthenticated(server: str) -> None:
    log.warning(
        "sealing with %s is UNAUTHENTICATED (no CA to check its sealing certificate, e.g. --insecure): it "
        "stops passive observers, not a proxy that rewrites the session",
        server,
    )


def _sealer(t: Transport, priv, req, info):
    """The client's Sealer and its worth; with a trusted CA, a missing or bad handshake signature is fatal."""
    from tandem.protos.handshake import HandshakeError, transcript_hash, verify
    from tandem.protos.sealing import Sealer, SealError

    if not info.seal_public_key:
        raise ClientError("the server did not agree to seal tensors; it is too old, or pass --no-seal")
    transcript = transcript_hash(info.session_id, req.seal_public_key, info.seal_public_key, req, info)
    if t.ca_pem is None:
        _warn_unauthenticated(t.cfg.server)
        sealing = "unauthenticated"
    else:
        try:
            verify(info.seal_certificate, info.seal_signature, transcript, t.ca_pem)
        except HandshakeError as e:
            raise ClientError(
                f"sealing handshake refused: {e}; a proxy on the path may be rewriting the session "
                "(or the server predates authenticated sealing)"
            ) from None
        sealing = "authenticated"
    try:
        return Sealer(priv, info.seal_public_key, info.session_id, "client", transcript), sealing
    except SealError as e:
        raise ClientError(f"sealing handshake refused: {e}") from None


def connect_split(
    t: Transport,
    lora: LoraConfig,
    seed: int,
    remote_lora: bool = True,
    model_id: str = "",
    cloud_optimizer: dict | None = None,
) -> StagedModel:
    """Opens a session, fetches the client's stages and builds the split model (see open_session)."""
    first = open_session(t, lora, remote_lora, model_id, cloud_optimizer)
    info = first.info
    try:
        config = config_from_json(info.model_config_json)
    except StageError as e:
        _close_quietly(t, info.session_id)
        raise ClientError(f"the server's model configuration is not usable: {e}") from None
    layout = StageLayout(info.layout.num_layers, info.layout.bottom, info.layout.top)
    try:
        files = fetch_client_files(
            t, info.session_id, info.client_stages_sha256, info.client_stages_bytes, info.client_files_sha256
        )
    except ClientError:
        _close_quietly(t, info.session_id)  # a refused download must not hold one of the identity's sessions
        raise
    state = unpack_state(files["client_stages.safetensors"])
    parts = client_parts(config, layout, state)
    tokenizer = load_tokenizer(files)
    _check_tokenizer(tokenizer, config)
    targets = lora.target_modules or arch_for(config).lora_targets
    specs = inject_slots(parts.blocks, parts.arch, layout.client_blocks, targets)
    specs += [SlotSpec(s.name, s.in_features, s.out_features) for s in info.middle_slots]
    specs = _order(specs)
    adapter = LoRAAdapter(specs, lora, generator=_gen(seed))
    names = _split_names(specs, layout)
    k = layout.bottom
    bottom = BottomStage(parts, list(range(k)))
    top = TopStage(parts, list(range(k, k + layout.top)))
    pending = [first]

    def opener() -> Session:
        if pending:
            return pending.pop()
        s = open_session(t, lora, remote_lora, model_id, cloud_optimizer)
        same = s.info.client_stages_sha256 == info.client_stages_sha256 and [x.name for x in s.info.middle_slots] == [
            x.name for x in info.middle_slots
        ]
        if not same:
            raise ClientError(
                "the server came back with a different model or layout; this run cannot continue against it"
            )
        return s

    middle = RemoteMiddle(t, opener, adapter.params_for(names[1]), cloud_optimizer=cloud_optimizer is not None)
    return StagedModel(
        bottom,
        middle,
        top,
        adapter,
        names,
        layout,
        info.model_id,
        config,
        tokenizer,
        "split",
        stages_sha256=info.client_stages_sha256,
    )


def build_local(
    model_path: str | None, client_blocks: str, lora: LoraConfig, seed: int, middle_lora: bool = True
) -> StagedModel:
    """The whole model in this process with the same stages and adapter (for exactness checks).

    With middle_lora=False only the client's blocks get LoRA slots (split mode's remote_lora=False).
    """
    from tandem.stages.loading import default_model_dir
    from tandem.stages.loading import load_tokenizer as load_tokenizer_dir

    loaded = load_model(model_path)
    parts: Parts = parts_of(loaded.model)
    layout = StageLayout.parse(client_blocks, loaded.config)
    targets = lora.target_modules or parts.arch.lora_targets
    ids = list(range(num_blocks(loaded.config))) if middle_lora else layout.client_blocks
    specs = _order(inject_slots(nn.ModuleList(parts.blocks[i] for i in ids), parts.arch, ids, targets))
    adapter = LoRAAdapter(specs, lora, generator=_gen(seed))
    names = _split_names(specs, layout)
    tokenizer = load_tokenizer_dir(model_path or default_model_dir())  # the loader of every mode (split's ids)
    _check_tokenizer(tokenizer, loaded.config)
    middle = LocalMiddle(MiddleStage(parts, layout.middle_blocks), adapter, names[1])
    return StagedModel(
        BottomStage(parts, layout.bottom_blocks),
        middle,
        TopStage(parts, layout.top_blocks),
        adapter,
        names,
        layout,
        loaded.model_id,
        loaded.config,
        tokenizer,
        "local",
    )
