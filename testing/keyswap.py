"""A man in the middle of the sealing handshake, riding a `Hop`: its own X25519 key toward each side."""

from __future__ import annotations

from tandem.protos import split_pb2 as pb

from .proxies import Hop


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


def minted_sealing_cert(tls_key_pem: bytes, tls_cert_pem: bytes) -> tuple:
    """What a hop holding the server's TLS key can mint: (a P-256 key, the DER of a certificate with the sealing
    purpose issued, i.e. signed, by that TLS key). Only a client that trusts the TLS certificate as a CA takes it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tandem.protos.handshake import SEALING_EKU

    tls_key = serialization.load_pem_private_key(tls_key_pem, None)
    tls_cert = x509.load_pem_x509_certificate(tls_cert_pem)
    key, now = ec.generate_private_key(ec.SECP256R1()), dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "hop")]))
        .issuer_name(tls_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([SEALING_EKU]), critical=True)
        .sign(tls_key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.DER)
