"""A hostile cloud for tests: a real gRPC proxy, with the cloud's own TLS key, in front of a real `cloud serve`.

It forwards every call byte for byte, except the FileChunk streams (FetchClientStages, FetchEmulator) and the
OpenSession reply, which a test may rewrite. The client cannot tell it from the real server: same certificate,
same CA, mutual TLS with the client's identity on both hops.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent import futures

import grpc

from tandem.client.staged import connect_split
from tandem.client.transport import Transport, TransportConfig
from tandem.cloud.tls import server_credentials
from tandem.protos import offsite_pb2, serving_pb2, split_pb2
from tandem.protos.bundle import read_bundle
from tandem.stages.lora import LoraConfig

FILE_STREAMS = ("/tandem.v1.SplitTuning/FetchClientStages", "/tandem.v1.OffsiteTuning/FetchEmulator")
OPEN_SESSION = "/tandem.v1.SplitTuning/OpenSession"


def _streaming_methods() -> set[str]:
    out = set()
    for mod in (split_pb2, offsite_pb2, serving_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                if m.client_streaming:
                    raise NotImplementedError(f"the proxy does not forward client streams ({m.full_name})")
                if m.server_streaming:
                    out.add(f"/{svc.full_name}/{m.name}")
    return out


def chunk(name: str, data: bytes, offset: int = 0, total: int | None = None, sha: str | None = None):
    """A FileChunk; by default the whole file in one chunk with its true size and SHA-256."""
    return split_pb2.FileChunk(
        name=name,
        offset=offset,
        data=data,
        total_bytes=len(data) if total is None else total,
        sha256=hashlib.sha256(data).hexdigest() if sha is None else sha,
    )


def whole_files(chunks) -> dict[str, bytes]:
    """The files of an honest chunk stream, by name, in order."""
    files: dict[str, bytes] = {}
    for c in chunks:
        files[c.name] = files.get(c.name, b"") + c.data
    return files


class HostileProxy:
    """Listens on loopback as the cloud; `rewrite(chunks) -> iterable of chunks` replaces each file stream.

    `on_open(resp)` may alter an OpenSessionResponse in place. `yielded` counts the chunks sent to the client.
    """

    def __init__(self, server, rewrite=None, on_open=None):
        self.rewrite, self.on_open = rewrite, on_open
        self.yielded = 0
        self._lock = threading.Lock()
        key, cert, ca = read_bundle(server.identity)
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self.upstream = grpc.secure_channel(server.addr, creds, options=[("grpc.max_receive_message_length", -1)])
        self.streams = _streaming_methods()
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(4), handlers=[_Forward(self)], options=[("grpc.max_send_message_length", -1)]
        )
        port = self.grpc.add_secure_port("127.0.0.1:0", server_credentials(server.tls_dir))
        self.addr = f"127.0.0.1:{port}"
        self.grpc.start()

    def count(self) -> None:
        with self._lock:
            self.yielded += 1

    def close(self) -> None:
        self.grpc.stop(0)
        self.upstream.close()


def _relay_error(e: grpc.RpcError, context) -> None:
    context.set_trailing_metadata(tuple(e.trailing_metadata() or ()))
    context.abort(e.code(), e.details())


class _Forward(grpc.GenericRpcHandler):
    """Every method, as raw bytes; the file streams and OpenSession pass through the test's hooks."""

    def __init__(self, proxy: HostileProxy):
        self.p = proxy

    def service(self, details):
        method = details.method
        if method in self.p.streams:
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._stream(method, req, ctx))
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method, req, ctx))

    def _unary(self, method: str, req: bytes, context) -> bytes:
        try:
            resp = self.p.upstream.unary_unary(method)(req, timeout=120)
        except grpc.RpcError as e:
            _relay_error(e, context)
        if method == OPEN_SESSION and self.p.on_open is not None:
            msg = split_pb2.OpenSessionResponse.FromString(resp)
            self.p.on_open(msg)
            resp = msg.SerializeToString()
        return resp

    def _stream(self, method: str, req: bytes, context):
        try:
            raw = list(self.p.upstream.unary_stream(method)(req, timeout=120))
        except grpc.RpcError as e:
            _relay_error(e, context)
        if method not in FILE_STREAMS or self.p.rewrite is None:
            yield from raw
            return
        for c in self.p.rewrite([split_pb2.FileChunk.FromString(b) for b in raw]):
            if not context.is_active():  # the client hung up: a real server stops here too
                return
            self.p.count()
            yield c.SerializeToString()


def connect_via(addr: str, server, **kw):
    """A split model built through `addr` (the server itself or a proxy in front of it), its session closed."""
    t = Transport(TransportConfig(server=addr, ca=server.ca, identity=server.identity, retries=0, **kw))
    try:
        sm = connect_split(t, LoraConfig(rank=4, alpha=8), seed=0)
        sm.close()
        return sm
    finally:
        t.close()
