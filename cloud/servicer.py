"""gRPC servicer: decodes requests, calls BackboneService, encodes replies, maps errors to status codes."""
from __future__ import annotations

import logging

import grpc

from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.stages.errors import StageError
from tandem.stages.lora import LoraConfig

from . import errors
from .service import CODECS, BackboneService

log = logging.getLogger(__name__)

_STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotOwner: grpc.StatusCode.PERMISSION_DENIED,
    errors.StepNotPending: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StateEvicted: grpc.StatusCode.ABORTED,
    errors.LoraMissing: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def identity(context: grpc.ServicerContext) -> str:
    """The caller's identity: the client certificate's common name under mutual TLS, else 'anonymous'."""
    cn = context.auth_context().get("x509_common_name")
    return cn[0].decode() if cn else "anonymous"


def _guard(method):
    """Runs a handler, turning domain errors into gRPC statuses; other sessions are unaffected."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except errors.CloudError as e:
            context.set_trailing_metadata((("tandem-reason", e.reason),))
            context.abort(_STATUS.get(type(e), grpc.StatusCode.INTERNAL), str(e))
        except (serde.WireError, StageError, ValueError) as e:
            context.set_trailing_metadata((("tandem-reason", "invalid"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except MemoryError:
            context.set_trailing_metadata((("tandem-reason", "too-large"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request; retry with a smaller batch")

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class SplitTuningServicer(pb_grpc.SplitTuningServicer):
    """Thin gRPC shell over a BackboneService."""

    def __init__(self, service: BackboneService):
        self.service = service

    def _layout(self) -> pb.StageLayout:
        lay = self.service.layout
        return pb.StageLayout(num_layers=lay.num_layers, bottom=lay.bottom, top=lay.top)

    @_guard
    def GetInfo(self, request, context):
        svc = self.service
        return pb.GetInfoResponse(
            model_id=svc.loaded.model_id, layout=self._layout(), model_config_json=svc.config_json,
            max_message_bytes=serde.MAX_MESSAGE_BYTES, max_tokens_per_step=svc.limits.max_tokens_per_step,
            codecs=list(CODECS),
        )

    @_guard
    def OpenSession(self, request, context):
        lr = request.lora
        cfg = LoraConfig(rank=lr.rank or 8, alpha=lr.alpha or 16.0, dropout=lr.dropout,
                         target_modules=tuple(lr.target_modules))
        s = self.service.open_session(identity(context), request.model_id, cfg, request.remote_lora,
                                      request.codec or "float32")
        svc = self.service
        return pb.OpenSessionResponse(
            session_id=s.id, model_id=svc.loaded.model_id, layout=self._layout(), model_config_json=svc.config_json,
            middle_slots=[pb.Slot(name=x.name, in_features=x.in_features, out_features=x.out_features) for x in s.slots],
            client_stages_sha256=svc.client_sha, client_stages_bytes=len(svc.client_blob), ttl_s=svc.store.cfg.ttl_s,
        )

    def FetchClientStages(self, request, context):
        try:
            self.service.store.get(request.session_id, identity(context))
        except errors.CloudError as e:
            context.set_trailing_metadata((("tandem-reason", e.reason),))
            context.abort(_STATUS[type(e)], str(e))
        for name, blob in self.service.client_files.items():
            digest = self.service.client_file_sha[name]
            for off in range(0, max(len(blob), 1), serde.CHUNK_BYTES):
                yield pb.FileChunk(name=name, offset=off, data=blob[off : off + serde.CHUNK_BYTES],
                                   total_bytes=len(blob), sha256=digest if off == 0 else "")

    @_guard
    def Forward(self, request, context):
        h = serde.from_proto(request.hidden, "hidden")
        mask = serde.from_proto(request.attention_mask, "attention_mask")
        lora = serde.from_proto(request.lora, "lora") if request.HasField("lora") else None
        out, dt = self.service.forward(identity(context), request.session_id, request.step, h, mask,
                                       request.lora_version, lora, request.dropout_seed, request.train)
        return pb.ForwardResponse(hidden=serde.to_proto(out), compute_s=dt)

    @_guard
    def Backward(self, request, context):
        g = serde.from_proto(request.grad_output, "grad_output")
        gin, glora, dt = self.service.backward(identity(context), request.session_id, request.step, g)
        return pb.BackwardResponse(grad_input=serde.to_proto(gin), lora_grad=serde.to_proto(glora), compute_s=dt)

    @_guard
    def CloseSession(self, request, context):
        self.service.close_session(identity(context), request.session_id)
        return pb.CloseSessionResponse()
