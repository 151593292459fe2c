"""gRPC servicer of Offsite-Tuning: the emulator download from an OffsiteService, adapter push and list, signed.

What the client relies on - the package's files, the push and list replies - is signed over the client's nonce
by the serving process's sealing key (protos/handshake.py), which a TLS-terminating hop does not hold."""

from __future__ import annotations

import grpc

from tandem.emulator.package import MANIFEST
from tandem.protos import offsite_pb2 as pb
from tandem.protos import offsite_pb2_grpc as pb_grpc
from tandem.protos import serde
from tandem.protos.handshake import MAX_NONCE_BYTES, package_transcript, reply_transcript, sign

from .errors import AdapterRejected, InvalidRequest
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


def checked_nonce(request) -> bytes:
    """The request's nonce, which the reply signs back; refused when longer than a nonce needs to be."""
    if len(request.nonce) > MAX_NONCE_BYTES:
        raise InvalidRequest(f"the nonce is {len(request.nonce)} bytes; at most {MAX_NONCE_BYTES} are signed")
    return request.nonce


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
        sealing=None,
    ):
        """`sealing`: (ECDSA P-256 key, certificate DER) that signs replies (cloud/tls.py load_sealing), or None."""
        self.service = service
        self.registry = registry
        self.identities = identities
        self.streams = streams or StreamSlots(4, 600.0)  # shared with FetchClientStages (cloud/server.py)
        self.sealing = sealing

    def _signature(self, transcript: bytes) -> tuple[bytes, bytes]:
        """(certificate DER, signature over the transcript); empty without a sealing key."""
        if self.sealing is None:
            return b"", b""
        key, cert_der = self.sealing
        return cert_der, sign(key, transcript)

    def _signed(self, method: str, request, reply):
        """The reply with its signature over the request as received and every other field of the reply."""
        reply.seal_certificate, reply.seal_signature = self._signature(reply_transcript(method, request, reply))
        return reply

    @guarded
    def FetchEmulator(self, request, context, who):
        self.service.require_package()
        nonce = checked_nonce(request)
        release = self.streams.take(context)  # before any work: an unread stream holds a worker, bounded and timed
        try:
            digests = {name: digest for name, (_, digest) in self.service.files.items()}
            seal = self._signature(package_transcript(nonce, digests))
            for piece in self.service.chunks(serde.CHUNK_BYTES):  # read from disk as the client reads
                chunk = pb.PackageChunk(**piece._asdict())
                if piece.name == MANIFEST and piece.offset == 0:
                    chunk.seal_certificate, chunk.seal_signature = seal
                self.identities.pace(who, chunk.ByteSize(), context)
                yield chunk
        finally:
            release()

    @guarded
    def PushAdapter(self, request, context, who):  # `who` is the adapter's owner
        checked_nonce(request)  # the reply signs the whole request back
        files = {}
        for f in request.files:
            if f.name in files:
                raise AdapterRejected(f"file {f.name!r} was sent twice")
            files[f.name] = (f.data, f.sha256)
        reg, again = self.registry.push(request.name, files, owner=who, public=request.public)
        reply = pb.PushAdapterResponse(adapter=registered_to_proto(reg), already_registered=again)
        return self._signed("PushAdapter", request, reply)

    @guarded
    def ListAdapters(self, request, context, who):
        checked_nonce(request)
        reply = pb.ListAdaptersResponse(adapters=[registered_to_proto(r) for r in self.registry.list(who)])
        return self._signed("ListAdapters", request, reply)


def add_offsite(
    server: grpc.Server,
    service: OffsiteService,
    registry: AdapterRegistry,
    identities: Identities,
    streams: StreamSlots | None = None,
    sealing=None,
) -> None:
    """Registers the Offsite-Tuning servicer on a grpc.Server (`streams`: the download slots it shares; `sealing`:
    the key and certificate that sign its replies)."""
    servicer = OffsiteServicer(service, registry, identities, streams, sealing)
    pb_grpc.add_OffsiteTuningServicer_to_server(servicer, server)
