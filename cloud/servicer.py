"""gRPC servicer: identity, unsealing and decoding, a call into BackboneService, encoding and sealing, status codes."""

from __future__ import annotations

import functools
import logging
import threading
import time

import grpc
import torch

from tandem.kernels.codecs import CODECS, DEFAULT_BLOCK
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.protos.handshake import files_digest, sign, transcript_hash
from tandem.protos.sealing import Sealer, SealError, new_keypair
from tandem.stages.errors import StageError
from tandem.stages.lora import LoraConfig

from . import errors
from .identity import Identities
from .metrics import Metrics
from .optimizer import AdamWSpec
from .service import BackboneService
from .streams import StreamSlots

log = logging.getLogger(__name__)
_caller = threading.local()  # the identity `_who` resolved for the handler running on this thread

_STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotOwner: grpc.StatusCode.PERMISSION_DENIED,
    errors.StepNotPending: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StateEvicted: grpc.StatusCode.ABORTED,
    errors.LoraMissing: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OverQuota: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.SealFailure: grpc.StatusCode.INVALID_ARGUMENT,
}


def _guard(method):
    """Runs a handler: counts it, turns domain errors into gRPC statuses; other sessions are unaffected."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        name = method.__name__
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        _caller.name = None
        try:
            resp = method(self, request, context)
            nbytes = resp.ByteSize()
            self.metrics.bytes_out.labels(name).inc(nbytes)
            if _caller.name is not None:  # responses count against the byte quota too
                self.identities.charge_reply(_caller.name, nbytes)
            return resp
        except errors.CloudError as e:
            code, reason, msg = _STATUS.get(type(e), grpc.StatusCode.INTERNAL), e.reason, str(e)
        except (serde.WireError, StageError, ValueError) as e:
            code, reason, msg = grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(e)
        except MemoryError:
            code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "too-large"
            msg = "the server ran out of memory for this request; retry with a smaller batch"
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: INTERNAL, one log line, never UNKNOWN
            if getattr(getattr(context, "_state", None), "aborted", False):
                raise  # the handler aborted with its own status already
            code, reason = grpc.StatusCode.INTERNAL, "internal"
            msg = "the server failed on this request (logged); retry, and report it if it persists"
            log.error("%s: internal error: %s: %s", name, type(e).__name__, _bounded(str(e), 200))
        finally:
            self.metrics.requests.labels(name, code.name).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            self.metrics.bytes_in.labels(name).inc(request.ByteSize())
            self.metrics.sessions.set(len(self.service.store))
            self.metrics.state_bytes.set(self.service.store.used_bytes)
            batcher = getattr(self.service, "batcher", None)
            if batcher is not None:
                self.metrics.batch_passes.set(batcher.batches)
                self.metrics.batch_requests.set(batcher.batched_requests)
                self.metrics.batch_compute.set(batcher.compute_s)
        # One line per refused request, never a traceback; malformed ones at INFO (an operator may want to see a fuzzer).
        log.log(
            logging.INFO if reason in ("invalid", "seal") else logging.DEBUG,
            "%s refused: %s %s: %s",
            name,
            code.name,
            reason,
            _bounded(msg, 160),
        )
        context.set_trailing_metadata((("tandem-reason", reason),))
        context.abort(code, _bounded(msg, MAX_DETAILS))

    return wrapper


MAX_DETAILS = 1024  # characters of an error's details: they travel in a header, and may quote the request


def _bounded(text: str, limit: int) -> str:
    """One line of at most `limit` characters (an ellipsis marks a cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SplitTuningServicer(pb_grpc.SplitTuningServicer):
    """Thin gRPC shell over a BackboneService."""

    def __init__(
        self,
        service: BackboneService,
        identities: Identities | None = None,
        metrics: Metrics | None = None,
        require_sealing: bool = False,
        sealing=None,
        streams: StreamSlots | None = None,
    ):
        """`sealing`: (ECDSA P-256 key, certificate DER) that signs sealing handshakes (cloud/tls.py load_sealing)."""
        self.service = service
        self.sealing = sealing
        self.identities = identities or Identities(None, mutual=False)
        self.metrics = metrics or Metrics()
        self.require_sealing = require_sealing
        self.streams = streams or StreamSlots(4, 600.0)

    def _who(self, request, context) -> str:
        name = self.identities.resolve(context)
        self.identities.charge(name, request.ByteSize())
        _caller.name = name
        return name

    def _layout(self) -> pb.StageLayout:
        lay = self.service.layout
        return pb.StageLayout(num_layers=lay.num_layers, bottom=lay.bottom, top=lay.top)

    def _open(self, session, request) -> None:
        """Unseals a request in place (sealed sessions), counting failures in the metrics."""
        if session.sealer is None:
            if self.require_sealing:
                raise errors.SealFailure("this server requires sealed tensors; open the session with a sealing key")
            return
        try:
            session.sealer.open(request, request.step)
        except SealError as e:
            self.metrics.seal_failures.labels(e.kind).inc()
            log.warning("session %s...: sealed payload rejected (%s)", session.id[:8], e.kind)
            raise errors.SealFailure(str(e)) from None

    @_guard
    def GetInfo(self, request, context):
        self._who(request, context)
        svc = self.service
        return pb.GetInfoResponse(
            model_id=svc.loaded.model_id,
            layout=self._layout(),
            model_config_json=svc.config_json,
            max_message_bytes=serde.MAX_MESSAGE_BYTES,
            max_tokens_per_step=svc.limits.max_tokens_per_step,
            codecs=list(CODECS),
        )

    @_guard
    def OpenSession(self, request, context):
        owner = self._who(request, context)
        lr = request.lora
        cfg = LoraConfig(
            rank=lr.rank or 8, alpha=lr.alpha or 16.0, dropout=lr.dropout, target_modules=tuple(lr.target_modules)
        )
        codec = request.codec or "float32"
        gcodec = request.gradient_codec or codec
        lcodec = request.lora_codec or "float32"
        for c in (codec, gcodec, lcodec):
            if c not in CODECS:
                raise errors.InvalidRequest(f"codec {errors.clip(c)} is not supported; choose one of {list(CODECS)}")
        if self.require_sealing and not request.seal_public_key:
            raise errors.SealFailure(
                "this server requires sealed tensors; the client must send a sealing key (do not pass --no-seal)"
            )
        opt = None
        if request.HasField("cloud_optimizer"):
            o = request.cloud_optimizer
            opt = AdamWSpec(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay)
        s = self.service.open_session(owner, request.model_id, cfg, request.remote_lora, codec, gcodec, optimizer=opt)
        s.lora_codec = lcodec
        resp = pb.OpenSessionResponse(
            session_id=s.id,
            model_id=self.service.loaded.model_id,
            layout=self._layout(),
            model_config_json=self.service.config_json,
            middle_slots=[
                pb.Slot(name=x.name, in_features=x.in_features, out_features=x.out_features) for x in s.slots
            ],
            client_stages_sha256=self.service.client_sha,
            client_stages_bytes=len(self.service.client_blob),
            ttl_s=self.service.store.cfg.ttl_s,
            codec=codec,
            gradient_codec=gcodec,
            block_size=DEFAULT_BLOCK,
            lora_codec=lcodec,
            cloud_optimizer=opt is not None,
            client_files_sha256=files_digest(self.service.client_file_sha),  # signed: the tokenizer too
        )
        if request.seal_public_key:
            try:
                s.sealer = self._handshake(s.id, request, resp)
            except SealError as e:
                self.service.store.close(s.id, owner)
                raise errors.InvalidRequest(str(e)) from None
        return resp

    def _handshake(self, sid: str, request, resp) -> Sealer:
        """Answers the client's sealing key with ours and signs the transcript (keys + every negotiated field)."""
        priv, pub = new_keypair()
        resp.seal_public_key = pub
        transcript = transcript_hash(sid, request.seal_public_key, pub, request, resp)
        if self.sealing is not None:
            key, cert_der = self.sealing
            resp.seal_certificate = cert_der
            resp.seal_signature = sign(key, transcript)
        return Sealer(priv, request.seal_public_key, sid, "server", transcript)

    def FetchClientStages(self, request, context):
        try:
            who = self._who(request, context)
            self.service.store.get(request.session_id, who)
            release = self.streams.take(context)  # bounded and timed: unread streams must not hold every worker
        except errors.CloudError as e:
            context.set_trailing_metadata((("tandem-reason", e.reason),))
            context.abort(_STATUS[type(e)], str(e))
        try:
            yield from self._client_stage_chunks(who, context)
        finally:
            release()

    def _client_stage_chunks(self, who: str, context):
        for name, blob in self.service.client_files.items():
            digest = self.service.client_file_sha[name]
            for off in range(0, max(len(blob), 1), serde.CHUNK_BYTES):
                chunk = pb.FileChunk(
                    name=name,
                    offset=off,
                    data=blob[off : off + serde.CHUNK_BYTES],
                    total_bytes=len(blob),
                    sha256=digest if off == 0 else "",
                )
                try:
                    self.identities.pace(who, chunk.ByteSize(), context)  # every streamed byte counts
                except errors.CloudError as e:
                    context.set_trailing_metadata((("tandem-reason", e.reason),))
                    context.abort(_STATUS[type(e)], str(e))
                yield chunk

    @_guard
    def Forward(self, request, context):
        owner = self._who(request, context)
        s = self.service.store.get(request.session_id, owner)
        self._open(s, request)
        h = serde.decode(request.hidden, "hidden", s.codec)
        mask = serde.from_proto(request.attention_mask, "attention_mask")
        lora = serde.decode(request.lora, "lora", s.lora_codec) if request.HasField("lora") else None
        out, dt = self.service.forward(
            owner,
            request.session_id,
            request.step,
            h,
            mask,
            request.lora_version,
            lora,
            request.dropout_seed,
            request.train,
        )
        resp = pb.ForwardResponse(hidden=serde.encode(out, s.codec), compute_s=dt)
        if s.sealer is not None:
            s.sealer.seal(resp, request.step)
        return resp

    @_guard
    def Backward(self, request, context):
        owner = self._who(request, context)
        s = self.service.store.get(request.session_id, owner)
        self._open(s, request)
        g = serde.decode(request.grad_output, "grad_output", s.gradient_codec)
        gin, glora, dt = self.service.backward(owner, request.session_id, request.step, g)
        resp = pb.BackwardResponse(grad_input=serde.encode(gin, s.gradient_codec), compute_s=dt)
        if s.opt_spec is None:  # a cloud optimizer session gets no LoRA gradients: the cloud applied them
            resp.lora_grad.CopyFrom(serde.encode(glora, s.lora_codec))
        if s.sealer is not None:
            s.sealer.seal(resp, request.step)
        self.metrics.steps.inc()
        return resp

    @_guard
    def GetRemoteState(self, request, context):
        owner = self._who(request, context)
        s = self.service.store.get(request.session_id, owner)
        st = self.service.remote_state(owner, request.session_id)
        resp = pb.RemoteState(
            session_id=s.id,
            step=request.step,
            lora=serde.to_proto(st["lora"]),
            exp_avg=serde.to_proto(st["exp_avg"]),
            exp_avg_sq=serde.to_proto(st["exp_avg_sq"]),
            optimizer_steps=st["steps"],
            lora_version=st["version"],
        )
        if s.sealer is not None:
            s.sealer.seal(resp, request.step)
        return resp

    @_guard
    def PutRemoteState(self, request, context):
        owner = self._who(request, context)
        s = self.service.store.get(request.session_id, owner)
        self._open(s, request)
        flat = [
            serde.from_proto(getattr(request, f), f) if request.HasField(f) else None
            for f in ("lora", "exp_avg", "exp_avg_sq")
        ]
        flat = [t if t is not None or i == 0 else torch.zeros(0) for i, t in enumerate(flat)]
        self.service.put_remote_state(owner, request.session_id, *flat, request.optimizer_steps, request.lora_version)
        return pb.PutRemoteStateResponse()

    @_guard
    def CloseSession(self, request, context):
        self.service.close_session(self._who(request, context), request.session_id)
        return pb.CloseSessionResponse()
