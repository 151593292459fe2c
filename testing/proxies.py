"""gRPC proxies in this process that play a hostile hop or a hostile cloud in front of a real `cloud serve`.

`Hop` is an active TLS-terminating load balancer: it holds the server's own TLS certificate and key (so the
client's TLS checks pass), connects upstream with mutual TLS as the 'local' identity, and forwards every
SplitTuning RPC as raw bytes; hooks may rewrite any request or response on the way (`on_request[method]`,
`on_response[method]`: parsed message in, message out).

`HostileProxy` listens as the cloud itself (same certificate, same CA, mutual TLS on both hops) and forwards
every call byte for byte, except the FileChunk streams (FetchClientStages, FetchEmulator) and the OpenSession
reply, which a test may rewrite.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent import futures

import grpc

from tandem.client.transport import CHANNEL_OPTIONS, TransportConfig
from tandem.cloud.tls import server_credentials
from tandem.protos import offsite_pb2, serving_pb2, split_pb2
from tandem.protos.bundle import read_bundle

_SERVICE = split_pb2.DESCRIPTOR.services_by_name["SplitTuning"]


def _types(method: str):
    m = _SERVICE.methods_by_name[method]
    return getattr(split_pb2, m.input_type.name), getattr(split_pb2, m.output_type.name), m.server_streaming


class Hop:
    """A generic gRPC proxy in this process between a client and `server` (a `tandem.testing.servers.Server`)."""

    def __init__(self, server):
        self.upstream_addr = server.addr
        self.ca, self.identity = server.ca, server.identity
        with open(os.path.join(server.tls_dir, "server.key"), "rb") as f:
            self.tls_key = f.read()
        with open(os.path.join(server.tls_dir, "server.pem"), "rb") as f:
            self.tls_cert = f.read()
        key, cert, ca = read_bundle(server.identity)
        self.upstream = grpc.secure_channel(
            server.addr, grpc.ssl_channel_credentials(ca, key, cert), options=CHANNEL_OPTIONS
        )
        self.on_request: dict = {}
        self.on_response: dict = {}
        self.fail: dict = {}  # method -> (status code, details, tandem-reason): the hop answers with that error
        self.seen: list[tuple[str, object]] = []  # (method, request as the hop received it), parsed
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=CHANNEL_OPTIONS)
        self.server.add_generic_rpc_handlers((_HopForwarder(self),))
        port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)]))
        self.addr = f"127.0.0.1:{port}"
        self.server.start()

    def transport_cfg(self, **kw) -> TransportConfig:
        """A client config that reaches the server through this hop (same CA and identity as direct)."""
        kw.setdefault("ca", self.ca)
        kw.setdefault("identity", self.identity)
        return TransportConfig(server=self.addr, **kw)

    def rewrite(self, table: dict, method: str, raw: bytes, cls) -> bytes:
        with self.lock:
            fn = table.get(method)
        if fn is None:
            return raw
        return fn(cls.FromString(raw)).SerializeToString()

    def close(self) -> None:
        self.server.stop(0)
        self.upstream.close()


class _HopForwarder(grpc.GenericRpcHandler):
    """Forwards each call's bytes upstream; errors come back with their code, details and trailers."""

    def __init__(self, hop: Hop):
        self.hop = hop

    def service(self, details):
        full = details.method  # /tandem.v1.SplitTuning/Forward
        method = full.rsplit("/", 1)[1]
        if method not in _SERVICE.methods_by_name:
            return None
        req_cls, resp_cls, streaming = _types(method)
        hop = self.hop

        def unary(raw, context):
            with hop.lock:
                hop.seen.append((method, req_cls.FromString(raw)))
            raw = hop.rewrite(hop.on_request, method, raw, req_cls)
            if method in hop.fail:
                code, details, reason = hop.fail[method]
                context.set_trailing_metadata((("tandem-reason", reason),))
                context.abort(code, details)
            try:
                out = hop.upstream.unary_unary(full)(raw, timeout=120)
            except grpc.RpcError as e:
                _relay_error(e, context)
            return hop.rewrite(hop.on_response, method, out, resp_cls)

        def stream(raw, context):
            try:
                yield from hop.upstream.unary_stream(full)(raw, timeout=120)
            except grpc.RpcError as e:
                _relay_error(e, context)

        if streaming:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


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


def signed_by_the_cloud(tls_dir: str, nonce: bytes, chunks) -> list:
    """A FetchEmulator stream as a hostile *cloud* sends it: its files whole, signed with the serving process's own
    sealing key over the client's `nonce` (the client's own checks are then all that stand in the way)."""
    from tandem.cloud.tls import load_sealing
    from tandem.protos.handshake import package_transcript, sign

    key, cert = load_sealing(tls_dir)
    files = whole_files(chunks)
    out = [
        offsite_pb2.PackageChunk(name=n, data=b, total_bytes=len(b), sha256=hashlib.sha256(b).hexdigest())
        for n, b in files.items()
    ]
    manifest = next((c for c in out if c.name == "manifest.json"), out[-1])
    manifest.seal_certificate = cert
    manifest.seal_signature = sign(key, package_transcript(nonce, {c.name: c.sha256 for c in out}))
    return out


class HostileProxy:
    """Listens on loopback as the cloud; `rewrite(chunks) -> iterable of chunks` replaces each file stream.

    `on_open(resp)` may alter an OpenSessionResponse in place; `on_request(method, raw) -> raw` may rewrite any
    unary request on its way up. `yielded` counts the chunks sent to the client.
    """

    def __init__(self, server, rewrite=None, on_open=None, on_request=None):
        self.rewrite, self.on_open, self.on_request = rewrite, on_open, on_request
        self.yielded = 0
        self._lock = threading.Lock()
        key, cert, ca = read_bundle(server.identity)
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self.upstream = grpc.secure_channel(server.addr, creds, options=[("grpc.max_receive_message_length", -1)])
        self.streams = _streaming_methods()
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(4),
            handlers=[_HostileForwarder(self)],
            options=[("grpc.max_send_message_length", -1)],
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


class _HostileForwarder(grpc.GenericRpcHandler):
    """Every method, as raw bytes; the file streams and OpenSession pass through the test's hooks."""

    def __init__(self, proxy: HostileProxy):
        self.proxy = proxy

    def service(self, details):
        method = details.method
        if method in self.proxy.streams:
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._stream(method, req, ctx))
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method, req, ctx))

    def _unary(self, method: str, req: bytes, context) -> bytes:
        if self.proxy.on_request is not None:
            req = self.proxy.on_request(method, req)
        try:
            resp = self.proxy.upstream.unary_unary(method)(req, timeout=120)
        except grpc.RpcError as e:
            _relay_error(e, context)
        if method == OPEN_SESSION and self.proxy.on_open is not None:
            msg = split_pb2.OpenSessionResponse.FromString(resp)
            self.proxy.on_open(msg)
            resp = msg.SerializeToString()
        return resp

    def _stream(self, method: str, req: bytes, context):
        try:
            raw = list(self.proxy.upstream.unary_stream(method)(req, timeout=120))
        except grpc.RpcError as e:
            _relay_error(e, context)
        if method not in FILE_STREAMS or self.proxy.rewrite is None:
            yield from raw
            return
        for c in self.proxy.rewrite([split_pb2.FileChunk.FromString(b) for b in raw]):
            if not context.is_active():  # the client hung up: a real server stops here too
                return
            self.proxy.count()
            yield c.SerializeToString()


def _relay_error(e: grpc.RpcError, context) -> None:
    """Answers the client with the upstream's error: its code, details and trailers (tandem-reason)."""
    context.set_trailing_metadata(tuple(e.trailing_metadata() or ()))
    context.abort(e.code(), e.details())
