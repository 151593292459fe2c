"""A failed TLS handshake, recognised in a gRPC error and told as one line that names the certificates to check.

Retrying cannot fix a certificate, so the transport stops at once on these. gRPC reports them all as UNAVAILABLE
"failed to connect to all addresses"; the last error says what happened:
  - the client refused the server's certificate: "Tls handshake failed ... CERTIFICATE_VERIFY_FAILED / BAD_SIGNATURE"
    or "Hostname Verification Check failed";
  - the server refused the client's certificate: a TLS alert ("tlsv1 alert unknown ca"), or with TLS 1.3 only the
    server closing the socket ("Socket closed"); the local identity bundle is examined for the cause (expired, or
    another CA's).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import grpc

from .errors import ServerError, printable

CONNECT = "failed to connect to all addresses"
REASON = "tls-handshake"

# The server closed the socket during the handshake: its refusal of our certificate, or a connection cut by chance.
CLOSED = "closed"
REFUSED = "refused"  # the server said it refuses our certificate


def failure_kind(e: grpc.RpcError) -> str | None:
    """What failed in the TLS handshake behind `e` ('server-expired', 'server-ca', 'hostname', 'plaintext', 'refused',
    'closed'), or None when `e` is not a failed handshake."""
    try:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        detail = str(e.details() or "")
    except (AttributeError, TypeError):
        return None
    if CONNECT not in detail:  # a call cut after the connection was up is no handshake failure
        return None
    last = detail.lower()
    if "hostname verification" in last:
        return "hostname"
    if (
        "alert" in last
    ):  # the server sent a TLS alert (TLS 1.2: "tlsv1 alert unknown ca", "sslv3 alert certificate expired")
        return REFUSED
    if "handshake failed" in last or "certificate_verify_failed" in last or "tlsv1 alert" in last:
        if "wrong_version_number" in last:
            return "plaintext"
        if "expired" in last:
            return "server-expired"
        return "server-ca"
    if "socket closed" in last:
        return CLOSED
    return None


@dataclass
class Certificate:
    """What a person checks in a certificate: its name and its end of validity."""

    cn: str
    not_after: dt.datetime
    issuers_ok: bool  # issued by a certificate of the CA file in use

    @property
    def expired(self) -> bool:
        return self.not_after < dt.datetime.now(dt.UTC)

    def until(self) -> str:
        return f"{self.not_after:%Y-%m-%d %H:%M} UTC"

    def describe(self) -> str:
        return f"CN {self.cn!r}, {'expired on' if self.expired else 'valid until'} {self.until()}"


def read_certificate(cert_pem: bytes, ca_pem: bytes | None) -> Certificate | None:
    """The certificate's CN and expiry, and whether a certificate in ca_pem issued it; None when unreadable."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cas = x509.load_pem_x509_certificates(ca_pem) if ca_pem else []
    except ValueError:
        return None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Certificate(
        cn=printable(cn[0].value, 64) if cn else "?",
        not_after=cert.not_valid_after_utc,
        issuers_ok=any(_issued_by(cert, ca) for ca in cas),
    )


def _issued_by(cert, ca) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)  # issuer name, then signature
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass
class TlsSetup:
    """The certificates one transport uses: what a handshake failure message names."""

    server: str
    identity: str | None  # the identity bundle's path; None: no client certificate
    cert_pem: bytes | None
    ca_file: str  # where the trusted CA came from (a file, or the CA inside the bundle)
    ca_pem: bytes | None

    def certificate(self) -> Certificate | None:
        return read_certificate(self.cert_pem, self.ca_pem) if self.cert_pem else None

    def identity_problem(self) -> str:
        """What is wrong with the local identity alone ('' when nothing is): it settles a closed handshake at once."""
        cert = self.certificate()
        if self.identity is None or cert is None:
            return ""
        if cert.expired:
            return (
                f"identity bundle {self.identity} (CN {cert.cn!r}) expired on {cert.until()}: ask the operator for "
                f"a new one (`cloud certs issue {cert.cn} --force`)"
            )
        if not cert.issuers_ok:
            return (
                f"identity bundle {self.identity} ({cert.describe()}) is not issued by the CA this server trusts "
                f"({self.ca_file}, which issued the server's certificate): use the bundle this server's operator issued you"
            )
        return ""

    def error(self, kind: str) -> ServerError:
        """The one-line error for a handshake failure of `kind` (see failure_kind)."""
        host = self.server.rsplit(":", 1)[0]
        mine = self._mine()
        if kind == "plaintext":
            text = (
                f"the server at {self.server} does not speak TLS (a `cloud serve --insecure`?): "
                "use the TLS address, or --insecure only on a network you trust"
            )
        elif kind == "hostname":
            text = (
                f"the server's certificate does not name {host!r}: connect by a name it was issued for, or ask the "
                f"operator for a certificate naming {host} (`cloud certs init --host {host}`); {mine}"
            )
        elif kind == "server-expired":
            text = f"the server's TLS certificate has expired: ask the operator of {self.server} to renew it; {mine}"
        elif kind == "server-ca":
            text = (
                f"the server's certificate is not issued by the trusted CA: pass --ca with this server's "
                f"ca.pem, or --identity with a bundle its operator issued; {mine}"
            )
        else:
            text = self._refused()
        return ServerError(f"TLS handshake with {self.server} failed: {text}", grpc.StatusCode.UNAVAILABLE, REASON)

    def _refused(self) -> str:
        if self.identity is None:
            return (
                "the server closed the connection: it requires a client certificate; pass --identity with the "
                f"bundle its operator issued you (`cloud certs issue NAME`); trusted CA: {self.ca_file}"
            )
        problem = self.identity_problem()
        if problem:
            return f"the server refused the client certificate: {problem}"
        cert = self.certificate()
        desc = cert.describe() if cert else "unreadable certificate"
        return (
            f"the server refused identity bundle {self.identity} ({desc}): it is not issued by the CA this server "
            f"trusts, or the server requires another; check --identity and --ca ({self.ca_file})"
        )

    def _mine(self) -> str:
        cert = self.certificate()
        who = f"identity {self.identity} ({cert.describe()})" if self.identity and cert else "no identity bundle"
        return f"{who}; trusted CA: {self.ca_file}"
