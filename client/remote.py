"""The cloud's middle blocks as a differentiable nn.Module: the remote autograd function and the session's RPCs."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.lora import flatten

from .errors import ClientError, ServerError
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
        self.params = params  # a plain list: the adapter owns these parameters
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

    def forward(self, h, mask, step: int, seed: int, train: bool):
        if train and torch.is_grad_enabled():
            return RemoteFunction.apply(h, mask, self, step, seed, *self.params)
        return self.forward_rpc(h, mask, step, seed, train=False)

    def _call(self, method: str, req, step: int, kind: str):
        try:
            return self.transport.call(method, req, kind=kind, sealer=self.session.sealer, step=step)
        except ServerError as e:
            if e.reason == "no-session":
                raise SessionLost(str(e)) from None
            raise

    def forward_rpc(self, h, mask, step: int, seed: int, train: bool, force_lora: bool = False) -> torch.Tensor:
        version = self._version()
        meter = self.transport.meter
        t0 = time.perf_counter()
        req = pb.ForwardRequest(
            session_id=self.session.id,
            step=step,
            hidden=serde.encode(h, self.session.codec),
            attention_mask=serde.to_proto(mask.to(torch.uint8)),
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
        meter.step_serde_s += time.perf_counter() - t0
        try:
            resp = self._call("Forward", req, step, "Forward" if train else "EvalForward")
        except ServerError as e:
            if e.reason == "lora-missing" and not force_lora:
                return self.forward_rpc(h, mask, step, seed, train, force_lora=True)
            raise
        self.sent_version = version
        meter.step_cloud_s += resp.compute_s
        t0 = time.perf_counter()
        out = arrived(serde.decode(resp.hidden, "hidden", self.session.codec, tuple(h.shape)), h)
        meter.step_serde_s += time.perf_counter() - t0
        return out

    def backward_rpc(self, step: int, grad_out, h, mask, seed: int):
        meter = self.transport.meter
        t0 = time.perf_counter()
        req = pb.BackwardRequest(
            session_id=self.session.id, step=step, grad_output=serde.encode(grad_out, self.session.gradient_codec)
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
        grad_in = arrived(serde.decode(resp.grad_input, "grad_input", self.session.gradient_codec, tuple(h.shape)), h)
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
        flat = serde.decode(resp.lora_grad, "lora_grad", self.session.lora_codec)
        expected = sum(p.numel() for p in self.params)
        if flat.numel() != expected:
            raise ClientError(f"the cloud returned {flat.numel()} LoRA gradients, expected {expected}")
        return _unflatten(flat.to(self.params[0].device) if self.params else flat, self.params)

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
