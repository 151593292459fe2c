"""Offsite-Tuning's signed replies (emulator package, adapter push and list), checked as split mode's handshake is.

A TLS-terminating hop (a load balancer) holds the server's TLS key, so TLS alone cannot tell the client that a
package or a registry reply came from the serving process. That process signs them with its sealing key over a
nonce of the client's (protos/handshake.py); the client checks the certificate against the CA it trusts for
TLS and the signature against the transcript it computed itself. Without a CA (--insecure) nothing can be
checked: the reply is taken, with a warning, as split mode's unauthenticated sealing is.
"""

from __future__ import annotations

import functools
import logging
import os

from tandem.protos.handshake import NONCE_BYTES, HandshakeError, reply_transcript, verify

from .errors import ClientError
from .transport import Transport

log = logging.getLogger(__name__)


def fresh_nonce() -> bytes:
    """Random bytes the server signs back: no reply signed for an earlier request is taken for this one."""
    return os.urandom(NONCE_BYTES)


@functools.cache
def _warn_unchecked(server: str, what: str) -> None:
    log.warning("%s from %s is UNAUTHENTICATED (no CA to check the server's signature, e.g. --insecure)", what, server)


def check_signed(transport: Transport, what: str, certificate: bytes, signature: bytes, transcript: bytes) -> str:
    """'authenticated' when the serving process's sealing certificate (issued by the trusted CA) signed
    `transcript`; 'unauthenticated' without a CA. Otherwise a one-line ClientError naming `what` (e.g.
    "emulator package")."""
    if transport.ca_pem is None:
        _warn_unchecked(transport.cfg.server, what)
        return "unauthenticated"
    try:
        verify(certificate, signature, transcript, transport.ca_pem, signed=what, changed=f"the {what} was")
    except HandshakeError as e:
        raise ClientError(
            f"{what} refused: {e}; a proxy on the path may have substituted it (or the server predates signed replies)"
        ) from None
    return "authenticated"


def check_reply(transport: Transport, method: str, request, reply) -> str:
    """check_signed for a unary reply (PushAdapter, ListAdapters): its every field, over the request as sent."""
    transcript = reply_transcript(method, request, reply)
    return check_signed(transport, f"{method} reply", reply.seal_certificate, reply.seal_signature, transcript)


class PackageSeal:
    """Passes a FetchEmulator stream through, keeping the signature on the manifest's first chunk."""

    def __init__(self, manifest: str):
        self.manifest = manifest
        self.certificate, self.signature = b"", b""

    def watch(self, chunks):
        try:
            for chunk in chunks:
                if chunk.name == self.manifest and chunk.offset == 0:
                    self.certificate, self.signature = chunk.seal_certificate, chunk.seal_signature
                yield chunk
        finally:
            chunks.close()  # stops the server's stream as soon as the receiver has had enough
