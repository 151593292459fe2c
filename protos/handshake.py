"""The sealing handshake: the serving process signs both X25519 keys and the session's parameters.

A TLS-terminating hop (a load balancer) holds the server's TLS key, so TLS alone cannot tell the
client whom its sealing key belongs to. The serving process holds a separate sealing key whose
certificate, signed by the deployment's CA, carries its own ExtendedKeyUsage (SEALING_EKU) and is
no TLS certificate. It signs the transcript: a label, the session id, both X25519 keys and a
digest of every other field of OpenSessionRequest and OpenSessionResponse. The client checks the
certificate against the CA it trusts for TLS and the signature against the transcript it computed
itself; the transcript hash also salts the sealing keys (protos/sealing.py).

The same key signs what Offsite-Tuning's client relies on (protos/offsite.proto): the emulator
package's files (package_transcript) and the adapter push and list replies (reply_transcript),
each over a fresh nonce of the client's, so no hop can substitute them or replay old ones.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from .sealing import canonical

# A private arc: "tandem sealing". A certificate without it never signs a handshake.
SEALING_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
_LABEL = b"tandem/v1 sealing handshake"
_PACKAGE_LABEL = b"tandem/v1 emulator package"
_REPLY_LABEL = b"tandem/v1 signed reply"
NONCE_BYTES = 32  # what a client sends
MAX_NONCE_BYTES = 64  # what a server signs back at most
_SEAL_FIELDS = frozenset({"seal_public_key", "seal_certificate", "seal_signature"})


class HandshakeError(ValueError):
    """The server's proof of its sealing key is missing or does not hold."""


def transcript_hash(session_id: str, client_public: bytes, server_public: bytes, request, response) -> bytes:
    """SHA-256 over the label, session id, both keys and the parameters of both OpenSession messages."""
    params = hashlib.sha256(canonical(request, _SEAL_FIELDS) + canonical(response, _SEAL_FIELDS)).digest()
    return _hash_parts(_LABEL, session_id.encode(), client_public, server_public, params)


def package_transcript(nonce: bytes, digests: dict[str, str]) -> bytes:
    """What FetchEmulator signs: the client's nonce and every file's name and SHA-256 (the manifest's too)."""
    return _hash_parts(_PACKAGE_LABEL, nonce, files_digest(digests).encode())


def reply_transcript(method: str, request, reply) -> bytes:
    """What a signed unary reply (PushAdapter, ListAdapters) signs: the method, every field of the request as the
    server received it (its nonce too: a hop that rewrites the request is caught) and every other field of the
    reply. A pushed file counts by its name and SHA-256 (the server checks them against the data), so an adapter
    of hundreds of MB is not spelled out again."""
    files = {f.name: f.sha256 for f in getattr(request, "files", ())}
    asked = canonical(request, frozenset({"files"})) + files_digest(files).encode()
    return _hash_parts(_REPLY_LABEL, method.encode(), asked, canonical(reply, _SEAL_FIELDS))


def _hash_parts(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(4, "big") + part)  # length-prefixed: no two transcripts encode alike
    return h.digest()


def files_digest(digests: dict[str, str]) -> str:
    """SHA-256 over the sorted (name, SHA-256) pairs of the client's files (OpenSessionResponse.client_files_sha256)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


def sign(key: ec.EllipticCurvePrivateKey, transcript: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature of a transcript hash."""
    return key.sign(transcript, ec.ECDSA(hashes.SHA256()))


def _issuer(cert: x509.Certificate, ca_pem: bytes) -> None:
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise HandshakeError("the trusted CA file holds no PEM certificate") from None
    for ca in filter(_is_ca, cas):  # a trusted file may hold leaves too (a "full chain"): their keys issue nothing
        try:
            cert.verify_directly_issued_by(ca)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise HandshakeError("the sealing certificate is not signed by the CA this client trusts")


def _is_ca(cert: x509.Certificate) -> bool:
    """A certificate that may issue others: BasicConstraints CA, and keyCertSign when it states its key usage."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def _purpose(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        eku, ca = [], True
    if SEALING_EKU not in eku or ca:
        raise HandshakeError(
            "the certificate offered is not a sealing certificate (it lacks the tandem-sealing "
            "ExtendedKeyUsage; a TLS certificate cannot vouch for sealing keys)"
        )


def verify(
    cert_der: bytes,
    signature: bytes,
    transcript: bytes,
    ca_pem: bytes,
    now: dt.datetime | None = None,
    signed: str = "handshake",
    changed: str = "the sealing keys or session parameters were",
) -> x509.Certificate:
    """Checks the sealing certificate (CA, validity, purpose, key type) and its signature over `transcript`;
    `signed` and `changed` name what was signed in the errors."""
    if not cert_der or not signature:
        raise HandshakeError(f"the server sent no sealing certificate or no {signed} signature")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise HandshakeError("the sealing certificate is not a valid DER certificate") from None
    _issuer(cert, ca_pem)
    now = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise HandshakeError(
            f"the sealing certificate is outside its validity ({cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    _purpose(cert)
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise HandshakeError("the sealing certificate's key is not an ECDSA P-256 key")
    try:
        key.verify(signature, transcript, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise HandshakeError(f"the {signed} signature does not verify: {changed} changed on the way") from None
    return cert
