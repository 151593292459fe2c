"""An active TLS-terminating hop for tests: a load balancer holding the server's own TLS certificate and key.

It terminates the client's TLS with tls_dir/server.pem + server.key (so the client's TLS checks
pass), connects upstream to the real `cloud serve` with mutual TLS as the 'local' identity, and
forwards every SplitTuning RPC as raw bytes. Hooks may rewrite any request or response on the way
(`on_request[method]`, `on_response[method]`: parsed message in, message out) - the adversary of
tests/test_active_hop.py.
"""

from __future__ import annotations

import os
import threading
from concurrent import futures

import grpc

from tandem.client.transport import CHANNEL_OPTIONS, TransportConfig
from tandem.protos import split_pb2 as pb
from tandem.protos.bundle import read_bundle

_SERVICE = pb.DESCRIPTOR.services_by_name["SplitTuning"]


def _types(method: str):
    m = _SERVICE.methods_by_name[method]
    return getattr(pb, m.input_type.name), getattr(pb, m.output_type.name), m.server_streaming


class Hop:
    """A generic gRPC proxy in this process between a client and `server` (a conftest Server)."""

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
        self.server.add_generic_rpc_handlers((_Forwarder(self),))
        port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)]))
        self.addr = f"127.0.0.1:{port}"
        self.server.start()

    def tcfg(self, **kw) -> TransportConfig:
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


class _Forwarder(grpc.GenericRpcHandler):
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
                context.set_trailing_metadata(e.trailing_metadata() or ())
                context.abort(e.code(), e.details())
            return hop.rewrite(hop.on_response, method, out, resp_cls)

        def stream(raw, context):
            try:
                yield from hop.upstream.unary_stream(full)(raw, timeout=120)
            except grpc.RpcError as e:
                context.set_trailing_metadata(e.trailing_metadata() or ())
                context.abort(e.code(), e.details())

        if streaming:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


class KeySwap:
    """A man in the middle of the sealing handshake: its own X25519 key toward each side, re-encrypting both ways.

    With `resign`, it also signs the client-facing transcript with the server's TLS key (which a
    load balancer holds) and offers the TLS certificate as the sealing certificate. `plaintexts`
    lists (message, field, shape) of every tensor it managed to open.
    """

    def __init__(self, hop: Hop, resign: bool = False, sealing=None):
        """`sealing`: (private key, certificate DER) to sign with instead of the TLS key (implies resign)."""
        self.hop, self.resign, self.sealing = hop, resign or sealing is not None, sealing
        self.plaintexts: list[tuple[str, str, list[int]]] = []
        self.step = 0
        hop.on_request.update(
            OpenSession=self._open_request,
            Forward=self._relay_request,
            Backward=self._relay_request,
            PutRemoteState=self._relay_request,
        )
        hop.on_response.update(
            OpenSession=self._open_response,
            Forward=self._relay_response,
            Backward=self._relay_response,
            GetRemoteState=self._relay_response,
        )

    def _open_request(self, req):
        from tandem.protos.sealing import new_keypair

        self.client_request = pb.OpenSessionRequest.FromString(req.SerializeToString())
        self.up_priv, req.seal_public_key = new_keypair()
        self.server_request = pb.OpenSessionRequest.FromString(req.SerializeToString())
        return req

    def _open_response(self, resp):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from tandem.protos.handshake import sign, transcript_hash
        from tandem.protos.sealing import Sealer, new_keypair

        sid, server_pub = resp.session_id, resp.seal_public_key
        self.to_server = Sealer(
            self.up_priv,
            server_pub,
            sid,
            "client",
            transcript_hash(sid, self.server_request.seal_public_key, server_pub, self.server_request, resp),
        )
        down_priv, resp.seal_public_key = new_keypair()
        client_pub = self.client_request.seal_public_key
        th = transcript_hash(sid, client_pub, resp.seal_public_key, self.client_request, resp)
        self.to_client = Sealer(down_priv, client_pub, sid, "server", th)
        if self.sealing is not None:
            resp.seal_certificate, resp.seal_signature = self.sealing[1], sign(self.sealing[0], th)
        elif self.resign:
            tls_key = serialization.load_pem_private_key(self.hop.tls_key, None)
            resp.seal_certificate = x509.load_pem_x509_certificate(self.hop.tls_cert).public_bytes(
                serialization.Encoding.DER
            )
            resp.seal_signature = sign(tls_key, th)
        return resp

    def _read(self, msg, sealer, step: int) -> None:
        sealer.open(msg, step)
        self.plaintexts += [
            (type(msg).__name__, fd.name, list(v.shape)) for fd, v in msg.ListFields() if isinstance(v, pb.Tensor)
        ]

    def _relay_request(self, msg):
        self.step = msg.step
        self._read(msg, self.to_client, msg.step)
        self.to_server.seal(msg, msg.step)
        return msg

    def _relay_response(self, msg):
        self._read(msg, self.to_server, self.step)
        self.to_client.seal(msg, self.step)
        return msg
