"""A local certificate authority and server certificates, made with the `cryptography` package."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SEALING_CERT, SEALING_KEY = "sealing.pem", "sealing.key"  # the serving process's own: never give them to a proxy


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tandem"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _write_key(path: str, key) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(
    tls_dir: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"), days: int = 365, force: bool = False
) -> None:
    """Creates a CA and a server certificate for `hosts` in tls_dir (keys are mode 0600).

    Raises:
        FileExistsError: tls_dir already holds a CA and not `force` (a new CA breaks every issued bundle).
    """
    if not force and any(os.path.exists(os.path.join(tls_dir, f)) for f in (CA_CERT, CA_KEY)):
        raise FileExistsError(
            f"{tls_dir} already holds a CA; replacing it breaks every identity bundle issued from it "
            "(pass --force to replace it anyway, then re-issue every identity)"
        )
    os.makedirs(tls_dir, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tandem local CA"))
        .issuer_name(_name("tandem local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(os.path.join(tls_dir, CA_KEY), ca_key)
    _write_cert(os.path.join(tls_dir, CA_CERT), ca)
    issue(tls_dir, "tandem-server", hosts=hosts, days=days, server=True)
    issue_sealing(tls_dir, days=days)


def issue(
    tls_dir: str,
    name: str,
    hosts: tuple[str, ...] = (),
    days: int = 365,
    server: bool = False,
    not_before: dt.datetime | None = None,
) -> tuple[str, str]:
    """Issues a certificate signed by the CA in tls_dir; returns (cert path, key path)."""
    with open(os.path.join(tls_dir, CA_KEY), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(tls_dir, CA_CERT), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    now = not_before or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    stem = "server" if server else name
    cert_path, key_path = os.path.join(tls_dir, f"{stem}.pem"), os.path.join(tls_dir, f"{stem}.key")
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def issue_sealing(tls_dir: str, days: int = 365) -> tuple[str, str]:
    """Issues the serving process's sealing certificate (tls_dir/sealing.pem, .key mode 0600); returns their paths.

    Its key signs each session's sealing handshake (protos/handshake.py). Its only purpose is the
    tandem-sealing ExtendedKeyUsage, so a TLS key (which a load balancer may hold) can never stand
    in for it, and it cannot serve TLS either.
    """
    from tandem.protos.handshake import SEALING_EKU

    with open(os.path.join(tls_dir, CA_KEY), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(tls_dir, CA_CERT), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("tandem sealing"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([SEALING_EKU]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(tls_dir, SEALING_CERT), os.path.join(tls_dir, SEALING_KEY)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def load_sealing(tls_dir: str):
    """(private key, certificate DER) of the sealing identity in tls_dir; None when it has none."""
    if not os.path.exists(os.path.join(tls_dir, SEALING_CERT)):
        return None
    with open(os.path.join(tls_dir, SEALING_KEY), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(tls_dir, SEALING_CERT), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return key, cert.public_bytes(serialization.Encoding.DER)


LOCAL_IDENTITY = "local"


def ensure_server_tls(tls_dir: str) -> None:
    """Creates the CA, the server certificate and a 'local' client identity on first use; reuses them afterwards.

    The 'local' identity (tls_dir/clients/local.pem) is what a data owner on the same machine uses by default.
    """
    if not os.path.exists(os.path.join(tls_dir, CA_CERT)):
        init_ca(tls_dir)
    elif not os.path.exists(os.path.join(tls_dir, SERVER_CERT)):  # keep the CA: it signed the issued bundles
        issue(tls_dir, "tandem-server", hosts=("localhost", "127.0.0.1", "::1"), server=True)
    if not os.path.exists(os.path.join(tls_dir, SEALING_CERT)):  # a tls_dir made before authenticated sealing
        issue_sealing(tls_dir)
    if not os.path.exists(os.path.join(tls_dir, "clients", f"{LOCAL_IDENTITY}.pem")):
        issue_bundle(tls_dir, LOCAL_IDENTITY, replace=True)  # its bundle is gone: revoke the old certificate


def server_credentials(tls_dir: str, mutual: bool = True):
    """gRPC server credentials from tls_dir; mutual=True requires a client certificate signed by the CA."""
    import grpc

    with open(os.path.join(tls_dir, SERVER_KEY), "rb") as f:
        key = f.read()
    with open(os.path.join(tls_dir, SERVER_CERT), "rb") as f:
        cert = f.read()
    if not mutual:
        return grpc.ssl_server_credentials([(key, cert)])
    with open(os.path.join(tls_dir, CA_CERT), "rb") as f:
        ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


# Names the code or the CA directory give a meaning: the identity of callers without a certificate, and the
# stems of files in the CA directory (issue() writes NAME.pem/NAME.key there before moving them).
RESERVED_NAMES = frozenset({"anonymous", "server", "ca", "tandem-server", "tandem local ca", "revoked", "clients"})


def check_identity_name(name: str) -> None:
    """Raises ValueError unless `name` may name an identity (ASCII, 1-64 chars, not reserved in any case)."""
    from .identity import NAME_RE

    if not NAME_RE.fullmatch(name or ""):
        raise ValueError(
            f"identity name {name!r}: use 1-64 ASCII letters, digits, '-', '_' and '.', starting with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES or name.lower().startswith("tandem-"):
        raise ValueError(f"identity name {name!r} is reserved; choose another")


def issued_names(tls_dir: str) -> list[str]:
    """The identities issued from tls_dir (those with a certificate at clients/NAME.cert.pem)."""
    clients = os.path.join(tls_dir, "clients")
    if not os.path.isdir(clients):
        return []
    return sorted(f[: -len(".cert.pem")] for f in os.listdir(clients) if f.endswith(".cert.pem"))


def issue_bundle(
    tls_dir: str, name: str, days: int = 365, not_before: dt.datetime | None = None, replace: bool = False
) -> str:
    """Issues a data owner's identity: one PEM file (key, certificate, CA) at tls_dir/clients/NAME.pem, mode 0600.

    Args:
        replace: Issue a name that was issued before: its previous certificate is revoked first (its bundle
            would otherwise stay valid with no record left to revoke it by).

    Raises:
        ValueError: a bad or reserved name, or one issued before (in any letter case) without `replace`.
    """
    check_identity_name(name)
    clients = os.path.join(tls_dir, "clients")
    same = [n for n in issued_names(tls_dir) if n.lower() == name.lower()]
    if same and not replace:
        raise ValueError(
            f"identity {same[0]!r} was issued before; pass --force to revoke its certificate and issue a new one"
        )
    for old in same:
        revoke(tls_dir, old)
        if old != name:
            os.remove(os.path.join(clients, f"{old}.cert.pem"))
    os.makedirs(clients, exist_ok=True)
    cert_path, key_path = issue(tls_dir, name, days=days, not_before=not_before)
    bundle = os.path.join(clients, f"{name}.pem")
    with open(key_path, "rb") as k, open(cert_path, "rb") as c, open(os.path.join(tls_dir, CA_CERT), "rb") as ca:
        data = k.read() + c.read() + ca.read()
    fd = os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.remove(key_path)
    os.replace(cert_path, os.path.join(clients, f"{name}.cert.pem"))  # the operator keeps the certificate, not the key
    return bundle


def revoke(tls_dir: str, name: str) -> str:
    """Revokes NAME's current certificate, by serial; the server re-reads the list on change.

    Issuing NAME again (`cloud certs issue NAME --force`) gives a new certificate, with a new serial, that works.
    """
    import json

    from .identity import NAME_RE, cert_serial, read_revoked, revoked_path

    cert_path = os.path.join(tls_dir, "clients", f"{name}.cert.pem")
    serial = cert_serial(cert_path) if NAME_RE.fullmatch(name or "") else None
    if serial is None:
        raise FileNotFoundError(f"no identity {name!r} was issued from {tls_dir}")
    d = read_revoked(tls_dir)
    d["serials"] = sorted(set(d["serials"]) | {serial})
    if not d["names"]:
        del d["names"]  # only files written by older versions have name entries (see identity.read_revoked)
    tmp = revoked_path(tls_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(d, f, indent=2)
    os.replace(tmp, revoked_path(tls_dir))
    return serial
