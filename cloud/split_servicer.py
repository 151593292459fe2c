"""gRPC servicer of split tuning: unsealing and decoding, a call into a Backbone, encoding and sealing."""

from __future__ import annotations

import logging

import torch

from tandem.kernels.codecs import CODECS, DEFAULT_BLOCK
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.protos.handshake import files_digest, sign, transcript_hash
from tandem.protos.sealing import Sealer, SealError, new_keypair
from tandem.stages.lora import LoraConfig

from . import error_feedback, errors, generation, remote_lora
from .backbone import Backbone
from .identity import Identities
from .metrics import Metrics
from .optimizer import AdamWSpec
from .sessions import Session
from .status import Guarded, guarded
from .streams import StreamSlots

log = logging.getLogger(__name__)


class SplitServicer(Guarded, pb_grpc.SplitTuningServicer):
    """Thin gRPC shell over a Backbone. Every call looks its session up once, with the caller's identity
    (a session belongs to the identity that opened it), and hands the Session to the service."""

    def __init__(
        self,
        service: Backbone,
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

    def observe(self, method: str, request, code, seconds: float, reply) -> None:
        """Records one unary call in the metrics, with the sessions and batching gauges."""
        metrics, store = self.metrics, self.service.store
        if reply is not None:
            metrics.bytes_out.labels(method).inc(reply.ByteSize())
        metrics.requests.labels(method, code.name).inc()
        metrics.latency.labels(method).observe(seconds)
        metrics.bytes_in.labels(method).inc(request.ByteSize())
        metrics.sessions.set(len(store))
        metrics.state_bytes.set(store.used_bytes)
        batcher = self.service.batcher
        if batcher is not None:
            metrics.batch_passes.set(batcher.batches)
            metrics.batch_requests.set(batcher.batched_requests)
            metrics.batch_compute.set(batcher.compute_s)

    def _session(self, request, who: str) -> Session:
        """The request's session, if `who` opened it (NotOwner if another identity did, SessionNotFound if none)."""
        return self.service.store.get(request.session_id, who)

    def _layout(self) -> pb.StageLayout:
        layout = self.service.layout
        return pb.StageLayout(num_layers=layout.num_layers, bottom=layout.bottom, top=layout.top)

    def _unseal(self, session: Session, request) -> None:
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

    @guarded
    def GetInfo(self, request, context, who):
        service = self.service
        return pb.GetInfoResponse(
            model_id=service.loaded.model_id,
            layout=self._layout(),
            model_config_json=service.config_json,
            max_message_bytes=serde.MAX_MESSAGE_BYTES,
            max_tokens_per_step=service.limits.max_tokens_per_step,
            codecs=list(CODECS),
        )

    @guarded
    def OpenSession(self, request, context, who):
        asked = request.lora
        lora = LoraConfig(
            rank=asked.rank or 8,
            alpha=asked.alpha or 16.0,
            dropout=asked.dropout,
            target_modules=tuple(asked.target_modules),
            layers=tuple(request.lora_layers),  # untrusted: checked against the model at open_session
        )
        codec = request.codec or "float32"
        gradient_codec = request.gradient_codec or codec
        lora_codec = request.lora_codec or "float32"
        for name in (codec, gradient_codec, lora_codec):
            if name not in CODECS:
                raise errors.InvalidRequest(f"codec {errors.clip(name)} is not supported; choose one of {list(CODECS)}")
        if self.require_sealing and not request.seal_public_key:
            raise errors.SealFailure(
                "this server requires sealed tensors; the client must send a sealing key (do not pass --no-seal)"
            )
        optimizer = None
        if request.HasField("cloud_optimizer"):
            adamw = request.cloud_optimizer
            optimizer = AdamWSpec(adamw.lr, adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay)
        if request.kill_revive and (optimizer is not None or request.generation):
            raise errors.InvalidRequest("kill_revive is for tuning sessions whose optimizer runs on the client")
        session = self.service.open_session(
            who, request.model_id, lora, request.remote_lora, codec, gradient_codec, optimizer=optimizer
        )
        session.lora_codec = lora_codec
        session.kill_revive = request.kill_revive and self.service.kill_revive  # echoed: Forward may name live slots
        if request.error_feedback and not request.generation:
            error_feedback.begin(session)
        if request.generation:
            generation.begin(self.service, session)  # refused: the session is closed
        resp = self._opened(session)
        resp.kill_revive = session.kill_revive
        resp.error_feedback = session.feedback is not None  # echoed (and signed): we carry our streams' error
        if session.generation is not None:  # echoed (and signed): the client knows the server keeps a cache
            resp.generation, resp.max_cache_tokens = True, session.generation.max_tokens
        if request.seal_public_key:
            try:
                session.sealer = self._handshake(session.id, request, resp)
            except SealError as e:
                self.service.store.close(session)
                raise errors.InvalidRequest(str(e)) from None
        return resp

    def _opened(self, session: Session) -> pb.OpenSessionResponse:
        """The OpenSession reply for a session just opened (before the sealing handshake)."""
        service = self.service
        return pb.OpenSessionResponse(
            session_id=session.id,
            model_id=service.loaded.model_id,
            layout=self._layout(),
            model_config_json=service.config_json,
            middle_slots=[
                pb.Slot(name=x.name, in_features=x.in_features, out_features=x.out_features) for x in session.slots
            ],
            client_stages_sha256=service.client_files.stages_sha256,
            client_stages_bytes=service.client_files.stages_bytes,
            ttl_s=service.store.cfg.ttl_s,
            codec=session.codec,
            gradient_codec=session.gradient_codec,
            block_size=DEFAULT_BLOCK,
            lora_codec=session.lora_codec,
            cloud_optimizer=session.opt_spec is not None,
            lora_layers=list(session.lora_cfg.layers),  # as agreed; echoed, so a client knows the server honours it
            client_files_sha256=files_digest(service.client_files.sha256),  # signed: the tokenizer too
        )

    def _handshake(self, sid: str, request, resp) -> Sealer:
        """Answers the client's sealing key with ours and signs the transcript (keys + every negotiated field)."""
        private, public = new_keypair()
        resp.seal_public_key = public
        transcript = transcript_hash(sid, request.seal_public_key, public, request, resp)
        if self.sealing is not None:
            key, cert_der = self.sealing
            resp.seal_certificate = cert_der
            resp.seal_signature = sign(key, transcript)
        return Sealer(private, request.seal_public_key, sid, "server", transcript)

    @guarded
    def FetchClientStages(self, request, context, who):
        self._session(request, who)
        release = self.streams.take(context)  # bounded and timed: unread streams must not hold every worker
        try:
            for piece in self.service.client_files.chunks(serde.CHUNK_BYTES):  # read from the file as the client reads
                chunk = pb.FileChunk(**piece._asdict())
                self.identities.pace(who, chunk.ByteSize(), context)  # every streamed byte counts
                yield chunk
        finally:
            release()

    @guarded
    def Forward(self, request, context, who):
        session = self._session(request, who)
        self._unseal(session, request)
        codec = error_feedback.forward_codec(session, request)  # float32 for an exact evaluation forward
        self.service.checks.declared(request.hidden.shape, "hidden")  # before decoding allocates it
        hidden = error_feedback.received(session, serde.decode(request.hidden, "hidden", codec), codec)
        mask = serde.from_proto(request.attention_mask, "attention_mask")
        lora = serde.decode(request.lora, "lora", session.lora_codec) if request.HasField("lora") else None
        live = remote_lora.parse_live(session, request.live_slots)  # Kill-and-Revive; refused in other sessions
        if session.generation is not None:
            args = (request.past_length, hidden, mask, request.lora_version, lora, request.train)
            out, seconds = generation.forward(self.service, session, *args)
        elif request.past_length:
            raise errors.InvalidRequest("past_length is for generation sessions; this session was opened for tuning")
        else:
            out, seconds = self.service.forward(
                session,
                *(request.step, hidden, mask, request.lora_version, lora, request.dropout_seed, request.train),
                live=live,
            )
        encoder = error_feedback.encoder(self.service.store, session, "hidden", codec, request.step)
        resp = pb.ForwardResponse(hidden=serde.encode(out, codec, encoder=encoder), compute_s=seconds)
        if session.sealer is not None:
            session.sealer.seal(resp, request.step)
        return resp

    @guarded
    def Backward(self, request, context, who):
        session = self._session(request, who)
        generation.refuse_backward(session)
        self._unseal(session, request)
        codec = session.gradient_codec
        self.service.checks.declared(request.grad_output.shape, "grad_output")  # before decoding allocates it
        grad_out = error_feedback.received(session, serde.decode(request.grad_output, "grad_output", codec), codec)
        grad_in, lora_grad, seconds = self.service.backward(session, request.step, grad_out)
        encoder = error_feedback.encoder(self.service.store, session, "grad_input", codec, request.step)
        resp = pb.BackwardResponse(grad_input=serde.encode(grad_in, codec, encoder=encoder), compute_s=seconds)
        if session.opt_spec is None:  # a cloud optimizer session gets no LoRA gradients: the cloud applied them
            resp.lora_grad.CopyFrom(serde.encode(lora_grad, session.lora_codec))
        if session.sealer is not None:
            session.sealer.seal(resp, request.step)
        self.metrics.steps.inc()
        return resp

    @guarded
    def GetRemoteState(self, request, context, who):
        session = self._session(request, who)
        state = self.service.remote_state(session)
        resp = pb.RemoteState(
            session_id=session.id,
            step=request.step,
            lora=serde.to_proto(state["lora"]),
            exp_avg=serde.to_proto(state["exp_avg"]),
            exp_avg_sq=serde.to_proto(state["exp_avg_sq"]),
            optimizer_steps=state["steps"],
            lora_version=state["version"],
        )
        if session.sealer is not None:
            session.sealer.seal(resp, request.step)
        return resp

    @guarded
    def PutRemoteState(self, request, context, who):
        session = self._session(request, who)
        self._unseal(session, request)
        lora, exp_avg, exp_avg_sq = (
            serde.from_proto(getattr(request, name), name) if request.HasField(name) else None
            for name in ("lora", "exp_avg", "exp_avg_sq")
        )
        # A missing moment is an empty one (a state saved before the first step); a missing LoRA is refused.
        exp_avg = exp_avg if exp_avg is not None else torch.zeros(0)
        exp_avg_sq = exp_avg_sq if exp_avg_sq is not None else torch.zeros(0)
        self.service.put_remote_state(session, lora, exp_avg, exp_avg_sq, request.optimizer_steps, request.lora_version)
        return pb.PutRemoteStateResponse()

    @guarded
    def CloseSession(self, request, context, who):
        self.service.close_session(self._session(request, who))
        return pb.CloseSessionResponse()
