"""A session's remote LoRA in the cloud: taking a sent adapter, the cloud optimizer's step, its saved state."""

from __future__ import annotations

import torch

from tandem.kernels.checks import all_finite
from tandem.stages.errors import LayoutError
from tandem.stages.lora import slot_shapes, unflatten

from .errors import InvalidRequest, LoraMissing
from .optimizer import RemoteOptimizer
from .sessions import Session


def parse_live(session: Session, raw: bytes) -> list[bool] | None:
    """A Forward's live_slots (untrusted): one byte, 0 or 1, per remote slot; None when empty (every slot live)."""
    if not raw:
        return None
    if not session.kill_revive:
        raise InvalidRequest("live_slots: this session did not open with kill_revive")
    if len(raw) != len(session.slots):
        raise InvalidRequest(f"live_slots: expected {len(session.slots)} bytes (one per remote slot), got {len(raw)}")
    if any(b > 1 for b in raw):
        raise InvalidRequest("live_slots: each byte must be 0 (killed) or 1 (live)")
    return [b == 1 for b in raw]


def lora_for(
    session: Session, version: int, flat: torch.Tensor | None, live: list[bool] | None = None
) -> list[torch.Tensor]:
    """The remote LoRA tensors a forward runs with: `flat` when the client sent it (stored as `version`), else the
    held ones, which must be that version. The session's lock is held.

    Kill-and-Revive (`live`, one flag per slot): `flat` holds only the live slots' A,B, the killed slots keep the
    values held, and the killed slots' tensors come back detached (no gradient is computed for them)."""
    if not session.remote_lora:
        return []
    if flat is not None and live is not None and not all(live):
        _take_live(session, version, flat, live)
    elif flat is not None:
        _take(session, version, flat)
    elif not session.lora:
        raise LoraMissing("the cloud holds no remote LoRA for this session yet; resend the adapter with this Forward")
    elif version != session.lora_version:
        raise LoraMissing(
            f"the cloud holds remote-LoRA version {session.lora_version}, not {version}; resend the adapter"
        )
    if live is None:
        return session.lora
    return [t if live[i // 2] else t.detach() for i, t in enumerate(session.lora)]


def _take_live(session: Session, version: int, flat: torch.Tensor, live: list[bool]) -> None:
    """Stores the live slots' A,B (a flat float32 vector) over the held remote LoRA."""
    if not session.lora:
        raise LoraMissing("the cloud holds no remote LoRA for this session yet; resend every slot with this Forward")
    if flat.dtype != torch.float32 or flat.dim() != 1:
        raise InvalidRequest(f"lora: expected a flat float32 vector, got {flat.dtype} {list(flat.shape)}")
    if not all_finite(flat):
        raise InvalidRequest("lora: contains NaN or Inf")
    specs = [slot for slot, on in zip(session.slots, live) if on]
    try:
        tensors = iter(unflatten(flat, slot_shapes(specs, session.lora_cfg.rank)))
    except LayoutError as e:
        raise InvalidRequest(f"lora: {e} (for the {len(specs)} live slots)") from None
    held = session.lora
    session.lora = [next(tensors).clone().requires_grad_(True) if live[i // 2] else t for i, t in enumerate(held)]
    session.lora_version = version


def _take(session: Session, version: int, flat: torch.Tensor) -> None:
    """Stores a sent remote LoRA (a flat float32 vector) in the session."""
    if flat.dtype != torch.float32 or flat.dim() != 1:
        raise InvalidRequest(f"lora: expected a flat float32 vector, got {flat.dtype} {list(flat.shape)}")
    if not all_finite(flat):
        raise InvalidRequest("lora: contains NaN or Inf")
    try:
        tensors = unflatten(flat, slot_shapes(session.slots, session.lora_cfg.rank))
    except LayoutError as e:
        raise InvalidRequest(f"lora: {e}") from None
    if session.opt_spec is not None:  # a fresh start: new AdamW state (PutRemoteState restores a saved one)
        session.optimizer = RemoteOptimizer(session.opt_spec, tensors)
        session.lora = session.optimizer.tensors()
    else:
        session.lora = [t.clone().requires_grad_(True) for t in tensors]
    session.lora_version = version


def cloud_step(session: Session, flat_grad: torch.Tensor) -> torch.Tensor:
    """Applies a cloud optimizer session's update (its lock is held by the waiting request); nothing LoRA-sized
    goes back to the client, so this returns an empty gradient."""
    if not all_finite(flat_grad):
        raise InvalidRequest("lora gradient: contains NaN or Inf; the cloud optimizer does not step")
    session.lora = session.optimizer.step(flat_grad)
    session.lora_version += 1
    return torch.zeros(0)


def state_of(session: Session) -> dict:
    """The remote LoRA and its AdamW state of a cloud optimizer session (flat tensors, steps, version)."""
    with session.lock:
        if session.opt_spec is None:
            raise InvalidRequest("this session does not use a cloud optimizer; the client holds its remote LoRA itself")
        if session.optimizer is None:
            raise LoraMissing("the cloud holds no remote LoRA for this session yet; send it with the first Forward")
        return {**session.optimizer.state(), "version": session.lora_version}


def restore(
    session: Session,
    lora: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    steps: int,
    version: int,
) -> None:
    """Replaces a cloud optimizer session's remote LoRA and AdamW state (the client resumes a checkpoint)."""
    with session.lock:
        if session.opt_spec is None:
            raise InvalidRequest(
                "this session does not use a cloud optimizer; send the remote LoRA with Forward instead"
            )
        for name, tensor in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if tensor.dtype != torch.float32 or tensor.dim() != 1 or not all_finite(tensor):
                raise InvalidRequest(f"{name}: expected a finite flat float32 vector")
        if lora is None:
            raise InvalidRequest("lora: PutRemoteState needs the remote LoRA")
        before = (session.optimizer, session.lora, session.lora_version)
        try:
            lora_for(session, version, lora)
            session.optimizer.load(exp_avg, exp_avg_sq, int(steps))
        except BaseException:
            session.optimizer, session.lora, session.lora_version = before  # a rejected state changes nothing
            raise
