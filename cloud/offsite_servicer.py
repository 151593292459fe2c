"""gRPC servicer of Offsite-Tuning: the emulator download from an OffsiteService, adapter push and list."""

from __future__ import annotations

import grpc

from tandem.protos import offsite_pb2 as pb
from tandem.protos import offsite_pb2_grpc as pb_grpc
from tandem.protos import serde, split_pb2

from .errors import AdapterRejected
from .identity import Identities
from .offsite import OffsiteService
from .registry import AdapterRegistry, Registered
from .status import Guarded, guarded
from .streams import StreamSlots


def registered_to_proto(reg: Registered) -> pb.RegisteredAdapter:
    return pb.RegisteredAdapter(
        name=reg.name,
        sha256=reg.sha256,
        params=reg.params,
        blocks=reg.blocks,
        model_id=reg.model_id,
        owner=reg.owner,
        public=reg.public,
    )


class OffsiteServicer(Guarded, pb_grpc.OffsiteTuningServicer):
    """Thin gRPC shell over an OffsiteService and an AdapterRegistry. An adapter belongs to the identity that
    pushed it: others neither list it nor generate with it, unless it was pushed as public. Every call checks
    the caller's identity and charges its bytes, both ways, to the identity's byte quota."""

    def __init__(
        self,
        service: OffsiteService,
        registry: AdapterRegistry,
        identities: Identities,
        streams: StreamSlots | None = None,
    ):
        self.service = service
        self.registry = registry
        self.identities = identities
        self.streams = streams or StreamSlots(4, 600.0)  # shared with FetchClientStages (cloud/server.py)

    @guarded
    def FetchEmulator(self, request, context, who):
        files = list(self.service.package_files())
        release = self.streams.take(context)  # an unread stream holds a worker: bounded and timed
        try:
            for name, blob, digest in files:
                for off in range(0, max(len(blob), 1), serde.CHUNK_BYTES):
                    chunk = split_pb2.FileChunk(
                        name=name,
                        offset=off,
                        data=blob[off : off + serde.CHUNK_BYTES],
                        total_bytes=len(blob),
                        sha256=digest if off == 0 else "",
                    )
                    self.identities.pace(who, chunk.ByteSize(), context)
                    yield chunk
        finally:
            release()

    @guarded
    def PushAdapter(self, request, context, who):  # `who` is the adapter's owner
        files = {}
        for f in request.files:
            if f.name in files:
                raise AdapterRejected(f"file {f.name!r} was sent twice")
            files[f.name] = (f.data, f.sha256)
        reg, again = self.registry.push(request.name, files, owner=who, public=request.public)
        return pb.PushAdapterResponse(adapter=registered_to_proto(reg), already_registered=again)

    @guarded
    def ListAdapters(self, request, context, who):
        return pb.ListAdaptersResponse(adapters=[registered_to_proto(r) for r in self.registry.list(who)])


def add_offsite(
    server: grpc.Server,
    service: OffsiteService,
    registry: AdapterRegistry,
    identities: Identities,
    streams: StreamSlots | None = None,
) -> None:
    """Registers the Offsite-Tuning servicer on a grpc.Server (`streams`: the download slots it shares)."""
    pb_grpc.add_OffsiteTuningServicer_to_server(OffsiteServicer(service, registry, identities, streams), server)
