"""The cloud's middle blocks as a differentiable nn.Module: the remote autograd function and the session's RPCs."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from tandem.kernels.checks import all_finite
from tandem.kernels.feedback import Feedback, encoder_of, received
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.lora import flatten

from .errors import ClientError, ServerError
from .kill_revive import LoraTraffic, live_slots, selected, slot_versions, wire_live
from .session import CloudStateLost, Session, SessionLost
from .transport import Transport

log = logging.getLogger(__name__)


class RemoteFunction(torch.autograd.Function):
    """Forward sends h to the cloud; backward sends dL/d(out) and receives dL/dh and the remote-LoRA grads."""

    @staticmethod
    def forward(ctx, h, mask, remote, step, seed, *lora_params):
        ctx.remote, ctx.step, ctx.seed = remote, step, seed
        ctx.save_for_backward(h, mask)
        return remote.forward_rpc(h, mask, step, seed, train=True)

    @staticmethod
    def backward(ctx, grad_out):
        h, mask = ctx.saved_tensors
        grad_in, grad_lora = ctx.remote.backward_rpc(ctx.step, grad_out, h, mask, ctx.seed)
        return (grad_in, None, None, None, None, *grad_lora)


def arrived(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A decoded tensor (float32 on the CPU, whatever the codec) in `like`'s compute dtype and device."""
    return t.to(device=like.device, dtype=like.dtype)


def _unflatten(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Views of one flat tensor shaped like each of `params`, in order."""
    out, at = [], 0
    for p in params:
        out.append(flat[at : at + p.numel()].view_as(p))
        at += p.numel()
    return out


class RemoteMiddle(nn.Module):
    """The cloud's middle blocks as a differentiable call; owns the session's wire protocol.

    `opener()` opens a session (used again after the cloud restarts: `reopen`). `params` are the remote LoRA's
    parameters (trained here, or by the cloud with `cloud_optimizer`).
    """

    def __init__(self, transport: Transport, opener, params: list[nn.Parameter], cloud_optimizer: bool = False):
        super().__init__()
        self.transport = transport
        self.opener = opener
        self.session: Session = opener()
        self.feedback = Feedback()  # error feedback of our streams (used when the session agreed to it)
        self.params = params  # a plain list: the adapter owns these parameters
        self.sent_version: int | None = None
        # Cloud optimizer: the cloud updates the remote LoRA after every Backward; `params` hold its value
        # only when `synced` (at the start, and after fetch_state / put_state).
        self.cloud_optimizer = cloud_optimizer
        self.cloud_version = 0
        self.synced = True
        self.last_state: dict | None = None  # the last fetched (or put) AdamW state
        # Kill-and-Revive: each slot's version when the cloud last got it, and the live slots of the last training
        # Forward (their gradients, and only theirs, come down).
        self.sent_slots: list[int] | None = None
        self.step_live: list[bool] | None = None
        self.traffic = LoraTraffic()

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
        self.feedback.reset()  # error feedback restarts with every session, on both sides: a restart is a reopen
        self.sent_version = self.sent_slots = None
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

    def forward(self, h, mask, step: int, seed: int, train: bool):
        if not (train and torch.is_grad_enabled()):
            return self.forward_rpc(h, mask, step, seed, train=False)
        if h.requires_grad or any(p.requires_grad for p in self.params):
            return RemoteFunction.apply(h, mask, self, step, seed, *self.params)
        # Nothing below the top cut trains: one round trip, and the cloud keeps no state for a Backward.
        return self.forward_rpc(h, mask, step, seed, train=False, kind="Forward")

    def _feedback(self, stream: str, codec: str, step: int):
        """The error-feedback encoder of one of our streams at `step`; None without it (or in evaluation: step < 0)."""
        return encoder_of(self.feedback if self.session.error_feedback else None, stream, codec, step)

    def _received(self, x: torch.Tensor, codec: str) -> torch.Tensor:
        """A decoded hidden or gradient; an error-feedback session's sender rotated its int8/int4 tensors."""
        return received(x, codec) if self.session.error_feedback else x

    def _call(self, method: str, req, step: int, kind: str):
        try:
            return self.transport.call(method, req, kind=kind, sealer=self.session.sealer, step=step)
        except ServerError as e:
            if e.reason == "no-session":
                raise SessionLost(str(e)) from None
            raise

    def forward_rpc(
        self, h, mask, step: int, seed: int, train: bool, force_lora: bool = False, kind: str = ""
    ) -> torch.Tensor:
        """One Forward; `kind` is the meter's name for it (default: Forward in training, EvalForward otherwise)."""
        version = self._version()
        meter = self.transport.meter
        t0 = time.perf_counter()
        # --exact-eval: evaluation forwards (negative steps) travel in float32, both ways, whatever the codec
        codec = "float32" if step < 0 and not train and self.transport.cfg.exact_eval else self.session.codec
        req = pb.ForwardRequest(
            session_id=self.session.id,
            step=step,
            hidden=serde.encode(h, codec, encoder=self._feedback("hidden", codec, step)),
            attention_mask=serde.to_proto(mask.to(torch.uint8)),
            lora_version=version,
            dropout_seed=seed,
            train=train,
        )
        live = self._attach_lora(req, version, force_lora)
        meter.step_serde_s += time.perf_counter() - t0
        try:
            resp = self._call("Forward", req, step, kind or ("Forward" if train else "EvalForward"))
        except ServerError as e:
            if e.reason == "lora-missing" and not force_lora:
                return self.forward_rpc(h, mask, step, seed, train, force_lora=True, kind=kind)
            raise
        self.sent_version = version
        if req.HasField("lora") and live is not None:
            now = slot_versions(self.params)
            self.sent_slots = [v if on else old for on, v, old in zip(live, now, self.sent_slots or now)]
        if train:
            self.step_live = live
        meter.step_cloud_s += resp.compute_s
        t0 = time.perf_counter()
        out = arrived(self._received(serde.decode(resp.hidden, "hidden", codec, tuple(h.shape)), codec), h)
        meter.step_serde_s += time.perf_counter() - t0
        return out

    def _attach_lora(self, req, version: int, force: bool) -> list[bool] | None:
        """Puts the remote LoRA in `req` when the cloud lacks this version; returns the live slots it names
        (None: not a Kill-and-Revive session, every slot)."""
        live = live_slots(self.params) if self.session.kill_revive else None
        if self.params and (force or self.sent_version != version):
            if not self.synced:  # cloud optimizer: only the cloud has the current LoRA
                raise CloudStateLost(
                    f"the cloud no longer holds remote-LoRA version {version} of session "
                    f"{self.session.id[:8]}...; go back to the last checkpoint (`client tune --resume`)"
                )
            live = wire_live(self.params, self.sent_slots, force) if live is not None else None
            sent = selected(self.params, live)
            req.lora.CopyFrom(serde.encode(flatten(sent), self.session.lora_codec))
            self.traffic.count("sent", req.lora.ByteSize(), sent, self.params)
        if live is not None:
            req.live_slots = bytes(live)
        return live

    def backward_rpc(self, step: int, grad_out, h, mask, seed: int):
        meter = self.transport.meter
        t0 = time.perf_counter()
        req = pb.BackwardRequest(
            session_id=self.session.id,
            step=step,
            grad_output=serde.encode(
                grad_out,
                self.session.gradient_codec,
                encoder=self._feedback("grad_output", self.session.gradient_codec, step),
            ),
        )
        meter.step_serde_s += time.perf_counter() - t0
        try:
            resp = self._call("Backward", req, step, "Backward")
        except ServerError as e:
            if e.reason != "evicted":
                raise
            log.warning("step %d: the cloud evicted its forward state; recomputing the step's forward", step)
            self.forward_rpc(h, mask, step, seed, train=True)
            resp = self._call("Backward", req, step, "Backward")
        meter.step_cloud_s += resp.compute_s
        t0 = time.perf_counter()
        codec = self.session.gradient_codec
        grad_in = arrived(self._received(serde.decode(resp.grad_input, "grad_input", codec, tuple(h.shape)), codec), h)
        grads = self._lora_grads(resp)
        meter.step_serde_s += time.perf_counter() - t0
        return grad_in, grads

    def _lora_grads(self, resp) -> list:
        """The remote LoRA's gradients in a BackwardResponse (Nones: the cloud optimizer applied them)."""
        if self.cloud_optimizer:  # the cloud applied the update; the client's copy is now behind
            if resp.HasField("lora_grad"):
                raise ClientError(
                    "the server returned LoRA gradients in a cloud optimizer session; it did not apply them"
                )
            self.cloud_version += 1
            self.sent_version = self.cloud_version
            self.synced = False
            return [None] * len(self.params)
        live = self.step_live
        wanted = selected(self.params, live)
        expected = sum(p.numel() for p in wanted)
        try:  # the declared shape is checked before decoding allocates it
            flat = serde.decode(resp.lora_grad, "lora_grad", self.session.lora_codec, (expected,))
        except serde.WireError as e:
            raise ClientError(f"the cloud returned LoRA gradients that do not fit the remote LoRA: {e}") from None
        if not all_finite(flat):
            raise ClientError("the cloud returned LoRA gradients with NaN or Inf; the step is not applied")
        self.traffic.count("received", resp.lora_grad.ByteSize(), wanted, self.params)
        grads = iter(_unflatten(flat.to(self.params[0].device) if self.params else flat, wanted))
        out = [next(grads) if live is None or live[i // 2] else None for i in range(len(self.params))]
        # A slot killed (named live only to resend it) gets no gradient: it does not change.
        return [g if p.requires_grad else None for g, p in zip(out, self.params)]

    def fetch_state(self, step: int) -> dict:
        """Cloud optimizer: copies the cloud's remote LoRA into `params`; returns AdamW's state (for a checkpoint)."""
        resp = self._call(
            "GetRemoteState", pb.GetRemoteStateRequest(session_id=self.session.id, step=step), step, "GetRemoteState"
        )
        n = sum(p.numel() for p in self.params)
        lora = serde.from_proto(resp.lora, "lora", torch.float32)
        moments = [serde.from_proto(getattr(resp, f), f, torch.float32) for f in ("exp_avg", "exp_avg_sq")]
        if lora.numel() != n or any(m.numel() not in (0, n) for m in moments):
            raise ClientError(f"the cloud returned a remote state of the wrong size (expected {n} values)")
        with torch.no_grad():
            for p, value in zip(self.params, _unflatten(lora, self.params)):
                p.copy_(value)
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
            self.transport.call("CloseSession", pb.CloseSessionRequest(session_id=self.session.id), retry=False)
        except ServerError as e:
            log.info("closing the session: %s", e)
