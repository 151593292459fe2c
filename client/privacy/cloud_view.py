"""The recorded cloud view: RUN_DIR/cloud_view/, the requests the cloud received in a run, decoded as it decoded them."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from tandem.protos import serde
from tandem.protos import split_pb2 as pb

from ..errors import ClientError

VIEW_DIR = "cloud_view"  # the folder transport.Recorder writes under the run directory
MIDDLE_OUT = (
    "MiddleOutput"  # the middle's outputs the cloud computed for recorded steps (the client cannot recompute them)
)


@dataclass
class Received:
    """One recorded request as the cloud decoded it."""

    kind: str
    step: int
    order: int
    hidden: torch.Tensor | None  # (B, T, H): Forward/EvalForward hidden, Backward grad_output
    mask: torch.Tensor | None  # (B, T)
    path: str
    dropout_seed: int = 0  # Forward/EvalForward: the middle's dropout seed for the step, as sent


def middle_output_path(view_dir: str, step: int) -> str:
    """Where the middle's output of a recorded training step is kept."""
    return os.path.join(view_dir, f"{MIDDLE_OUT}-{step:06d}.bin")


def read_middle_output(run_dir: str, step: int) -> torch.Tensor | None:
    """The middle's output (B, T, H) of a recorded step, or None when it was not kept."""
    path = middle_output_path(os.path.join(run_dir, VIEW_DIR), step)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return serde.from_proto(pb.Tensor.FromString(f.read()), "middle output").float()


def decoded_tensor(msg, name: str) -> torch.Tensor:
    """A recorded tensor as the cloud decoded it (sealed recordings are refused: the audit reads opened ones)."""
    if getattr(msg, "sealed", False):
        raise ClientError(
            f"{name} was recorded sealed; the audit reads what the cloud decrypts: run the audit without --seal"
        )
    codec = getattr(msg, "codec", 0)
    if codec and hasattr(serde, "decode"):
        return serde.decode(msg, name, {v: k for k, v in serde.CODEC_ENUM.items()}[codec])
    return serde.from_proto(msg, name)


def _received(kind: str, order: int, raw: bytes, path: str) -> Received | None:
    """Decodes one recorded request; None for a kind the audit does not read."""
    if kind == "Backward":
        msg = pb.BackwardRequest.FromString(raw)
        return Received(kind, msg.step, order, decoded_tensor(msg.grad_output, "grad_output").float(), None, path)
    if kind in ("Forward", "EvalForward"):
        msg = pb.ForwardRequest.FromString(raw)
        hidden = decoded_tensor(msg.hidden, "hidden").float()
        mask = decoded_tensor(msg.attention_mask, "attention_mask").long()
        return Received(kind, msg.step, order, hidden, mask, path, msg.dropout_seed)
    return None


def read_cloud_view(run_dir: str) -> list[Received]:
    """Decodes every recorded request in RUN_DIR/cloud_view (the bytes the cloud received)."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, VIEW_DIR, "*-[0-9][0-9][0-9][0-9].bin"))):
        kind, num = os.path.basename(path)[:-4].rsplit("-", 1)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            received = _received(kind, int(num), raw, path)
        except Exception as e:  # noqa: BLE001 - any decode failure means the recording is unusable
            raise ClientError(
                f"{path} is not a {kind} request the cloud could have received ({e}); "
                "the audit attacks only intact recordings: rerun `client tune`"
            ) from None
        if received is not None:
            out.append(received)
    return out


def inventory(view: list[Received]) -> dict:
    """Every field and tensor dtype in the recorded requests, by kind."""
    fields_by_kind: dict[str, dict] = {}
    for received in view:
        with open(received.path, "rb") as f:
            msg = (pb.BackwardRequest if received.kind == "Backward" else pb.ForwardRequest).FromString(f.read())
        fields = fields_by_kind.setdefault(received.kind, {})
        for fd, value in msg.ListFields():
            fields[fd.name] = pb.DType.Name(value.dtype) if isinstance(value, pb.Tensor) else type(value).__name__
    return fields_by_kind
