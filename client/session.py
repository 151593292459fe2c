"""A cloud session: OpenSession with the transport's codecs, the sealing handshake, and the errors of a lost one."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from tandem.protos import split_pb2 as pb
from tandem.stages.lora import LoraConfig

from .errors import ClientError
from .transport import Transport

log = logging.getLogger(__name__)


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
    kill_revive: bool = False  # Forward names the live remote slots (client/kill_revive.py)
    error_feedback: bool = False  # both sides carry their int8/int4 streams' error (tandem.kernels.feedback)


def open_session(
    transport: Transport,
    lora: LoraConfig,
    remote_lora: bool = True,
    model_id: str = "",
    cloud_optimizer: dict | None = None,
    generation: bool = False,
    kill_revive: bool = False,
) -> Session:
    """OpenSession with the transport's codecs and, unless disabled, a sealing key exchange.

    cloud_optimizer: AdamW settings (lr, beta1, beta2, eps, weight_decay) for the cloud to apply the
    remote LoRA's updates itself; None keeps the optimizer here.
    generation: a private-generation session (the cloud keeps the middle's KV cache; no Backward).
    """
    from tandem.protos.sealing import new_keypair

    cfg = transport.cfg
    private_key, public_key = new_keypair() if cfg.seal else (None, b"")
    req = pb.OpenSessionRequest(
        model_id=model_id,
        lora=pb.LoraSpec(
            rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=list(lora.target_modules)
        ),
        remote_lora=remote_lora,
        codec=cfg.codec,
        gradient_codec=cfg.gradient_codec or cfg.codec,
        lora_codec=cfg.lora_codec,
        seal_public_key=public_key,
        lora_layers=list(lora.layers),
    )
    req.generation = generation
    req.error_feedback = cfg.error_feedback  # each side carries its int8/int4 streams' quantization error
    req.kill_revive = kill_revive  # Forward names the live remote slots; the cloud keeps the killed ones' values
    if cloud_optimizer is not None:
        req.cloud_optimizer.CopyFrom(pb.AdamW(**cloud_optimizer))
    info = transport.call("OpenSession", req, one_time=True)
    try:
        # The seal first: only then is the rest of the reply trusted.
        sealer, sealing = _sealer(transport, private_key, req, info) if cfg.seal else (None, "off")
        refuse_unechoed(req, info)
    except ClientError:
        close_refused_session(transport, info.session_id)
        raise
    return Session(
        info.session_id,
        info.codec or "float32",
        info.gradient_codec or info.codec or "float32",
        sealer,
        info,
        info.lora_codec or "float32",
        sealing,
        kill_revive=info.kill_revive,
        error_feedback=info.error_feedback,
    )


def refuse_unechoed(req, info) -> None:
    """Refuses a reply that does not echo an option the request asked for: an old server ignores fields it does
    not know, and the run would silently do something else."""
    missing = {
        "--cloud-optimizer": req.HasField("cloud_optimizer") and not info.cloud_optimizer,
        "private generation": req.generation and not info.generation,
        "--error-feedback": req.error_feedback and not info.error_feedback,
        "--kill-revive": req.kill_revive and not info.kill_revive,
        "--lora-layers": list(info.lora_layers) != list(req.lora_layers),
    }
    for option, absent in missing.items():
        if absent:
            hint = "use `client push`" if option == "private generation" else "run without it"
            raise ClientError(f"the server does not support {option} (it is too old); {hint}")


def close_refused_session(transport: Transport, session_id: str) -> None:
    """Closes a session the client refuses, so that it does not count against the identity's quota until its TTL."""
    try:
        transport.call("CloseSession", pb.CloseSessionRequest(session_id=session_id), retry=False)
    except ClientError as e:
        log.info("closing the refused session: %s", e)


@functools.cache
def _warn_unauthenticated(server: str) -> None:
    log.warning(
        "sealing with %s is UNAUTHENTICATED (no CA to check its sealing certificate, e.g. --insecure): it "
        "stops passive observers, not a proxy that rewrites the session",
        server,
    )


def _sealer(transport: Transport, private_key, req, info):
    """The client's Sealer and its worth; with a trusted CA, a missing or bad handshake signature is fatal."""
    from tandem.protos.handshake import HandshakeError, transcript_hash, verify
    from tandem.protos.sealing import Sealer, SealError

    if not info.seal_public_key:
        raise ClientError("the server did not agree to seal tensors; it is too old, or pass --no-seal")
    transcript = transcript_hash(info.session_id, req.seal_public_key, info.seal_public_key, req, info)
    if transport.ca_pem is None:
        _warn_unauthenticated(transport.cfg.server)
        sealing = "unauthenticated"
    else:
        try:
            verify(info.seal_certificate, info.seal_signature, transcript, transport.ca_pem)
        except HandshakeError as e:
            raise ClientError(
                f"sealing handshake refused: {e}; a proxy on the path may be rewriting the session "
                "(or the server predates authenticated sealing)"
            ) from None
        sealing = "authenticated"
    try:
        return Sealer(private_key, info.seal_public_key, info.session_id, "client", transcript), sealing
    except SealError as e:
        raise ClientError(f"sealing handshake refused: {e}") from None
