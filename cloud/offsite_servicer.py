"""gRPC servicer of Offsite-Tuning: decodes requests, calls OffsiteService, maps errors to status codes."""

from __future__ import annotations

import grpc

from tandem.protos import offsite_pb2 as pb
from tandem.protos import offsite_pb2_grpc as pb_grpc
from tandem.protos import serde, split_pb2

from . import errors
from .identity import Identities
from .offsite import AdapterRejected, NameTaken, NoEmulator, OffsiteService, Registered, RegistryFull
from .streams import StreamSlots

_STATUS = {
    AdapterRejected: grpc.StatusCode.INVALID_ARGUMENT,
    RegistryFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OverQuota: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NameTaken: grpc.StatusCode.ALREADY_EXISTS,
    NoEmulator: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def _abort(context: grpc.ServicerContext, e: errors.CloudError) -> None:
    context.set_trailing_metadata((("tandem-reason", e.reason),))
    context.abort(_STATUS.get(type(e), grpc.StatusCode.INTERNAL), errors.details(e))


def _reg(r: Registered) -> pb.RegisteredAdapter:
    return pb.RegisteredAdapter(
        name=r.name,
        sha256=r.sha256,
        params=r.params,
        blocks=r.blocks,
        model_id=r.model_id,
        owner=r.owner,
        public=r.public,
    )


class OffsiteTuningServicer(pb_grpc.OffsiteTuningServicer):
    """Thin gRPC shell over an OffsiteService. An adapter belongs to the identity that pushed it: others
    neither list it nor generate with it, unless it was pushed as public. Every call checks the caller's
    identity and charges its bytes, both ways, to the identity's byte quota."""

    def __init__(self, service: OffsiteService, identities: Identities, streams: StreamSlots | None = None):
        self.service = service
        self.identities = identities
        self.streams = streams or StreamSlots(4, 600.0)  # shared with FetchClientStages (cloud/server.py)

    def _who(self, request, context) -> str:
        who = self.identities.resolve(context)
        self.identities.charge(who, request.ByteSize())
        return who

    def FetchEmulator(self, request, context):
        try:
            who = self._who(request, context)
            files = list(self.service.package_files())
            release = self.streams.take(context)  # an unread stream holds a worker: bounded and timed
        except errors.CloudError as e:
            _abort(context, e)
        try:
            yield from self._chunks(who, files, context)
        finally:
            release()

    def _chunks(self, who: str, files, context):
        for name, blob, digest in files:
            for off in range(0, max(len(blob), 1), serde.CHUNK_BYTES):
                chunk = split_pb2.FileChunk(
                    name=name,
                    offset=off,
                    data=blob[off : off + serde.CHUNK_BYTES],
                    total_bytes=len(blob),
                    sha256=digest if off == 0 else "",
                )
                try:
                    self.identities.pace(who, chunk.ByteSize(), context)
                except errors.CloudError as e:
                    _abort(context, e)
                yield chunk

    def PushAdapter(self, request, context):
        try:
            who = self._who(request, context)  # the adapter's owner
            files = {}
            for f in request.files:
                if f.name in files:
                    raise AdapterRejected(f"file {f.name!r} was sent twice")
                files[f.name] = (f.data, f.sha256)
            reg, again = self.service.push(request.name, files, owner=who, public=request.public)
        except errors.CloudError as e:
            _abort(context, e)
        resp = pb.PushAdapterResponse(adapter=_reg(reg), already_registered=again)
        self.identities.charge_reply(who, resp.ByteSize())
        return resp

    def ListAdapters(self, request, context):
        try:
            who = self._who(request, context)
        except errors.CloudError as e:
            _abort(context, e)
        resp = pb.ListAdaptersResponse(adapters=[_reg(r) for r in self.service.list(who)])
        self.identities.charge_reply(who, resp.ByteSize())
        return resp


def add_offsite(
    server: grpc.Server, service: OffsiteService, identities: Identities, streams: StreamSlots | None = None
) -> None:
    """Registers the Offsite-Tuning servicer on a grpc.Server (`streams`: the download slots it shares)."""
    pb_grpc.add_OffsiteTuningServicer_to_server(OffsiteTuningServicer(service, identities, streams), server)
